"""On a CUDA GPU (bench/gpu.sh runs these; skipped elsewhere): the method on the device gives
the allocation it gives on the CPU, and a run there fits its target."""
from __future__ import annotations

import copy

import pytest
import torch

from jointcomp import EngineConfig, Engine
from jointcomp.projector import LayerSpec, Projector
from jointcomp.budget import Budget, Accounting

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")]


def test_the_joint_projection_on_the_gpu_matches_the_cpu():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(5000, generator=g), torch.randn(300, 40, generator=g) * 0.1]
    specs = [LayerSpec("a", (5000,)), LayerSpec("b", (300, 40))]
    cpu = Projector(specs, Accounting()).joint(weights, Budget(20_000))
    gpu = Projector(specs, Accounting()).joint([w.cuda() for w in weights], Budget(20_000))
    assert cpu.bits.tolist() == gpu.bits.tolist()
    assert [int(m.sum()) for m in cpu.masks] == [int(m.sum()) for m in gpu.masks]
    assert gpu.size_bits <= 20_000


def test_a_run_on_the_gpu_fits(trained_mlp, digits):
    engine = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(target="100x", epochs=2, device="cuda"))
    final = list(engine)[-1]
    assert sum(int(b) * int(m.sum()) for b, m in zip(engine.final.bits, engine.final.masks)) <= final.target_bits
