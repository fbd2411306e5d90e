# `make run` sets up and opens the app; `make test` sets up and runs the whole suite.
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := chromium chromium-driver dataset-fashion-mnist

.PHONY: setup system-deps run test bench

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Chromium for the browser test, Fashion-MNIST for the LeNet-5 examples (Debian packages).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install:$$missing (sudo apt-get install$$missing)"; fi; \
	fi

run: setup
	$(PY) -m jointcomp compress --model mlp --data digits --target 50x --epochs 15 --out runs/demo

test: setup system-deps
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/projections.py
