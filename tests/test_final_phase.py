"""Admm's final phase: the network is trained in exactly the shape that ships. Checked on
the live weights during the phase, against the exported file, with a target moved during
the phase, and with distillation on and off."""
from __future__ import annotations

import copy

import torch

from jointcomp import CompressConfig, Engine, FinalRecord, load_compressed
from jointcomp.records import EpochRecord, StepRecord

META = {"model": "mlp", "data": "digits", "input_shape": [1, 8, 8], "num_classes": 10}


def partition(values: torch.Tensor) -> torch.Tensor:
    """Which kept weights share a value, as group labels numbered by first appearance."""
    _, inverse = values.unique(return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(inverse))
    first.scatter_reduce_(0, inverse, torch.arange(len(inverse)), reduce="amin")
    order = first.argsort().argsort()
    return order[inverse]


def test_final_phase_keeps_the_deployed_shape_and_is_what_the_file_holds(trained_mlp, digits, tmp_path):
    target = 32 * sum(w.numel() for n, w in trained_mlp.named_parameters() if n.endswith("weight")) / 60
    engine = Engine(trained_mlp, digits, CompressConfig(target="60x", epochs=6, finetune=0.5, device="cpu"), meta=META)
    names = ["1.weight", "3.weight", "5.weight"]
    shape = None  # masks and code partitions of the first fine-tuning step
    steps = 0
    records = []
    for record in engine:
        records.append(record)
        if not (isinstance(record, StepRecord) and record.phase == "finetune"):
            continue
        weights = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in names}
        now = {n: (w != 0, partition(w[w != 0])) for n, w in weights.items()}
        if shape is None:
            shape = now
        for n in names:
            assert torch.equal(now[n][0], shape[n][0]), "a mask changed during the final phase"
            assert torch.equal(now[n][1], shape[n][1]), "a code assignment changed during the final phase"
        steps += 1
    assert abs(steps - 3 * engine.steps_per_epoch) < engine.compressor.every  # half the run, at a projection
    epochs = [r for r in records if isinstance(r, EpochRecord) and r.phase == "finetune"]
    assert len(epochs) == 3
    assert len({r.size_bits for r in epochs}) == 1 and epochs[0].size_bits <= target
    for layer in epochs[-1].layers:
        w = dict(engine.model.named_parameters())[layer.name].detach()
        assert w[w != 0].unique().numel() <= 2**layer.bits
        assert int((w != 0).sum()) == layer.nnz

    final = records[-1]
    assert isinstance(final, FinalRecord) and final.size_bits <= target
    path = tmp_path / "model.jcz"
    engine.export(str(path))
    loaded = load_compressed(path)
    with torch.no_grad():
        accuracy = int((loaded(digits.val_x).argmax(1) == digits.val_y).sum()) / len(digits.val_y)
        trained = engine.model.state_dict()
        assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)  # the trained net is the shipped one
    assert accuracy == final.accuracy


def test_a_target_moved_during_the_final_phase_is_met(trained_mlp, digits):
    engine = Engine(trained_mlp, digits, CompressConfig(target="40x", epochs=4, finetune=0.5, device="cpu"))
    new = None
    records = []
    for record in engine:
        records.append(record)
        if isinstance(record, EpochRecord) and record.phase == "finetune" and new is None:
            new = engine.set_target("120x")
    final = records[-1]
    assert final.size_bits <= new == final.target_bits
    epochs = [r for r in records if isinstance(r, EpochRecord) and r.phase == "finetune"]
    assert "re-projected" in epochs[1].note  # said in the first record after the move
    assert all(r.size_bits <= new for r in epochs[1:])


def test_distillation_on_and_off_both_meet_the_target(trained_mlp, digits):
    for distill in (0.0, 0.7):
        model = copy.deepcopy(trained_mlp)
        final = list(Engine(model, digits, CompressConfig(target="80x", epochs=3, distill=distill, device="cpu")))[-1]
        assert final.size_bits <= final.target_bits
        assert final.accuracy > 0.85


def test_runs_of_any_length_end_in_the_final_phase_for_about_30_percent(trained_mlp, digits):
    """Projections come four times an epoch, so even a one-epoch run trains its last part in
    the deployed shape: admm steps, then final-phase steps, split at a projection."""
    for epochs in (1, 2, 10):
        engine = Engine(copy.deepcopy(trained_mlp), digits, CompressConfig(target="50x", epochs=epochs, device="cpu"))
        records = list(engine)
        phases = [r.phase for r in records if isinstance(r, StepRecord)]
        finetune = phases.count("finetune")
        assert phases == ["admm"] * (len(phases) - finetune) + ["finetune"] * finetune
        assert abs(finetune - 0.3 * len(phases)) <= engine.compressor.every
        assert [r for r in records if isinstance(r, EpochRecord)][-1].phase == "finetune"
