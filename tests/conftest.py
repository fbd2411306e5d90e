"""Shared fixtures: the bundled digits data and a dense MLP trained on it once per session.
`make test` runs the suite on two workers (pytest-xdist), each with one thread, its commands too:
two torch processes of two threads each on two cores would thrash."""
from __future__ import annotations

import copy
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

from jointcomp import EngineConfig, build_model, load_dataset
from jointcomp.trainer import train_dense


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def _trained_mlp_state(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    for _ in train_dense(model, digits, EngineConfig(device="cpu"), epochs=20):
        pass
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def trained_mlp(digits, _trained_mlp_state):
    """A fresh copy of the dense-trained digits MLP (tests may modify it)."""
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    model.load_state_dict(_trained_mlp_state)
    return model


@pytest.fixture
def image_folder(tmp_path):
    """A tiny ImageFolder of real digit images (8x8 grey PNGs): three classes, 30 training
    and 30 validation images each."""
    root, per_class = tmp_path / "images", 30
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    counts: dict[tuple[str, int], int] = {}
    for image, label in zip(digits.images, digits.target):
        if label > 2:
            continue
        part = "train" if counts.get(("train", label), 0) < per_class else "val"
        if counts.get((part, label), 0) >= per_class:
            continue
        counts[(part, label)] = counts.get((part, label), 0) + 1
        folder = root / part / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 255 / 16).astype("uint8"), mode="L").save(folder / f"{counts[(part, label)]}.png")
    return root
