"""Shared fixtures: the bundled digits data and a dense MLP trained on it once per session."""
from __future__ import annotations

import copy

import pytest
import torch

from jointcomp import CompressConfig, build_model, load_dataset
from jointcomp.trainer import train_dense


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="session")
def _trained_mlp_state(digits):
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    for _ in train_dense(model, digits, CompressConfig(device="cpu"), epochs=20):
        pass
    return copy.deepcopy(model.state_dict())


@pytest.fixture
def trained_mlp(digits, _trained_mlp_state):
    """A fresh copy of the dense-trained digits MLP (tests may modify it)."""
    model = build_model("mlp", digits.input_shape, digits.num_classes)
    model.load_state_dict(_trained_mlp_state)
    return model
