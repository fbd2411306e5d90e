# `make run` sets up and opens the app; `make test` sets up and runs the whole suite.
VENV := .venv
PY := $(VENV)/bin/python
# CIFAR-10 and the published ResNet checkpoints, offline, when ../shared is beside this checkout
SHARED := $(abspath ../shared)
export JOINTCOMP_DATA ?= $(if $(wildcard $(SHARED)/data),$(SHARED)/data)
export JOINTCOMP_MODELS ?= $(if $(wildcard $(SHARED)/models),$(SHARED)/models)
SYSTEM_PACKAGES := chromium chromium-driver dataset-fashion-mnist gcc binutils

.PHONY: setup system-deps run test bench bench-mcu bench-peers plots

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# Chromium for the browser test, Fashion-MNIST for the LeNet-5 examples, gcc for the C export's tests (Debian packages).
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	  else echo "please install:$$missing (sudo apt-get install$$missing)"; fi; \
	fi

run: setup
	$(VENV)/bin/streamlit run app.py --browser.gatherUsageStats false --server.fileWatcherType none

test: setup system-deps
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

bench: setup
	cd bench && ../$(PY) file_size.py && ../$(PY) solvers.py && ../$(PY) overhead.py && ../$(PY) distributed.py && ../$(PY) quality.py --model mlp --data digits --dense-epochs 20 --targets 50x 200x 800x

# README's results table and bench/plots/*.svg, from the stored rows (bench/results/*.jsonl); trains nothing.
plots: setup
	$(PY) bench/report.py

# The C export on an emulated Cortex-M4 (Debian's arm-none-eabi-gcc and qemu-system-arm).
bench-mcu: setup
	@dpkg -s gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm >/dev/null 2>&1 || \
	  apt-get install -y -q gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
	cd bench && ../$(PY) mcu.py

# jointcomp against Sony MCT and torchao, in their own virtualenv (the product never needs them).
.venv-peers/.installed: bench/requirements-peers.txt pyproject.toml
	python3 -m venv .venv-peers
	.venv-peers/bin/python -m pip install -q -r bench/requirements-peers.txt
	.venv-peers/bin/python -m pip install -q --no-deps -e .
	touch $@

bench-peers: .venv-peers/.installed system-deps
	cd bench && ../.venv-peers/bin/python peers.py --epochs 1 && ../.venv-peers/bin/python peers.py --epochs 15 --smallest-only --beyond
