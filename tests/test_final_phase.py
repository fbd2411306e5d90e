"""Admm's last two phases: retraining (masks and bitwidths fixed, the kept weights trained
through their quantization) and the final phase, where the network is trained in exactly
the shape that ships. Checked on the live weights during each phase, against the exported
file, with a target moved during either phase, and with distillation on and off."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from jointcomp import EngineConfig, Engine, FinalRecord, load_compressed
from jointcomp.projector import Allocation
from jointcomp.schedule import Schedule
from sizes import fits, paper_bits_in_file
from jointcomp.methods import snap
from jointcomp.methods.oscillations import Oscillations
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
    engine = Engine(trained_mlp, digits, EngineConfig(target="60x", epochs=6, finetune=0.5, device="cpu"), meta=META)
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
    assert abs(steps - 3 * engine.steps_per_epoch) < engine.compressor.schedule.every  # half the run, at a projection
    epochs = [r for r in records if isinstance(r, EpochRecord) and r.phase == "finetune"]
    assert len(epochs) == 3
    assert len({r.size_bits for r in epochs}) == 1 and epochs[0].size_bits <= target
    for layer in epochs[-1].layers:
        w = dict(engine.model.named_parameters())[layer.name].detach()
        assert w[w != 0].unique().numel() <= 2**layer.bits
        assert int((w != 0).sum()) == layer.nnz

    final = records[-1]
    path = tmp_path / "model.jcz"
    engine.export(str(path))
    assert isinstance(final, FinalRecord) and paper_bits_in_file(path) <= target
    loaded = load_compressed(path)
    with torch.no_grad():
        accuracy = int((loaded(digits.val_x).argmax(1) == digits.val_y).sum()) / len(digits.val_y)
        trained = engine.model.state_dict()
        assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)  # the trained net is the shipped one
    assert accuracy == final.accuracy


def test_retraining_fixes_masks_and_bits_while_the_codes_move(trained_mlp, digits):
    target = 32 * sum(w.numel() for n, w in trained_mlp.named_parameters() if n.endswith("weight")) / 60
    config = EngineConfig(target="60x", epochs=6, retrain=0.5, finetune=0.2, device="cpu")
    engine = Engine(trained_mlp, digits, config)
    names = ["1.weight", "3.weight", "5.weight"]
    masks, first, moved, distinct, records = None, None, False, [], []
    for record in engine:
        records.append(record)
        if not (isinstance(record, StepRecord) and record.phase == "retrain"):
            continue
        weights = {n: p.detach().clone() for n, p in engine.model.named_parameters() if n in names}
        now = {n: partition(w[w != 0]) for n, w in weights.items()}
        masks = masks or {n: w != 0 for n, w in weights.items()}
        first = first or now
        for n in names:
            assert torch.equal(weights[n] != 0, masks[n]), "a mask changed while retraining"
            moved = moved or not torch.equal(now[n], first[n])
        distinct.append({n: int(weights[n][weights[n] != 0].unique().numel()) for n in names})
    assert moved, "no code assignment moved while retraining: the kept weights did not train"
    fixed = [r for r in records if isinstance(r, EpochRecord) and r.phase in ("retrain", "finetune")]
    assert [r.phase for r in fixed] == ["retrain"] * 3 + ["finetune"] * 2
    assert len({r.size_bits for r in fixed}) == 1 and fixed[0].size_bits <= target
    assert len({tuple(layer.bits for layer in r.layers) for r in fixed}) == 1
    bits = {layer.name: layer.bits for layer in fixed[0].layers}
    assert all(d[n] <= 2 ** bits[n] for d in distinct for n in names)
    assert records[-1].size_bits <= target


@pytest.mark.parametrize("phase", ["retrain", "finetune"])
def test_a_target_moved_while_masks_are_fixed_is_met(trained_mlp, digits, phase):
    engine = Engine(trained_mlp, digits, EngineConfig(target="40x", epochs=4, finetune=0.5, device="cpu"))
    new = None
    records = []
    for record in engine:
        records.append(record)
        if isinstance(record, EpochRecord) and record.phase == phase and new is None:
            new = engine.set_target("120x")
    final = records[-1]
    assert final.size_bits <= new == final.target_bits
    epochs = [r for r in records if isinstance(r, EpochRecord) and r.phase in ("retrain", "finetune")]
    moved = next(i for i, r in enumerate(epochs) if r.phase == phase)
    assert "re-projected" in epochs[moved + 1].note  # said in the first record after the move
    assert all(r.size_bits <= new for r in epochs[moved + 1:])


def test_distillation_on_and_off_both_meet_the_target(trained_mlp, digits, tmp_path):
    for distill in (0.0, 0.7):
        model = copy.deepcopy(trained_mlp)
        engine = Engine(model, digits, EngineConfig(target="80x", epochs=3, distill=distill, device="cpu"))
        final = list(engine)[-1]
        engine.export(str(tmp_path / "model.jcz"))
        assert fits(tmp_path / "model.jcz", "80x", trained_mlp)
        assert final.accuracy > 0.85


def test_runs_of_any_length_retrain_then_end_in_the_final_phase_for_about_30_percent_each(trained_mlp, digits):
    """Projections come four times an epoch, so even a one-epoch run has all three phases:
    admm steps, retraining steps, then final-phase steps, each split at a projection."""
    for epochs in (1, 2, 10):
        engine = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(target="50x", epochs=epochs, device="cpu"))
        records = list(engine)
        phases = [r.phase for r in records if isinstance(r, StepRecord)]
        retrain, finetune = phases.count("retrain"), phases.count("finetune")
        assert phases == ["admm"] * (len(phases) - retrain - finetune) + ["retrain"] * retrain + ["finetune"] * finetune
        assert abs(retrain - 0.3 * len(phases)) <= engine.compressor.schedule.every
        assert abs(finetune - 0.3 * len(phases)) <= engine.compressor.schedule.every
        assert [r for r in records if isinstance(r, EpochRecord)][-1].phase == "finetune"


def test_a_retraining_step_moves_centres_by_their_members_updates_not_by_latent_outliers():
    """One 1-bit layer, centres -1 and 1, every weight updated by +0.1 since the last step; one
    latent weight has drifted to 50 and one to -0.2 (nearer to -1). The centres move by the
    mean update (-0.9, 1.1) whatever the latent values, the drifted-down weight changes its
    code, and the latent weights are held within the new codebook's range."""
    values = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0])
    weight = torch.nn.Parameter(values + 0.1)
    latent = [torch.tensor([-1.0, -1.0, -1.0, 1.0, -0.2, 50.0])]
    alloc = Allocation([torch.ones(6, dtype=torch.bool)], torch.tensor([1]), [torch.tensor([-1.0, 1.0])],
                       [torch.tensor([0, 0, 0, 1, 1, 1])], [values.clone()], 6.0, 0.0, 0.0)
    snap([weight], alloc, latent)
    assert torch.allclose(alloc.codebooks[0], torch.tensor([-0.9, 1.1]))
    assert torch.allclose(weight.detach(), torch.tensor([-0.9, -0.9, -0.9, 1.1, -0.9, 1.1]))
    assert torch.allclose(latent[0], torch.tensor([-0.9, -0.9, -0.9, 1.0, -0.2, 1.1]))


def retraining_codes(oscillations: Oscillations | None, steps: int) -> list[int]:
    """The code of a 1-bit weight whose latent value is pushed across the boundary between the
    centres -1 and 1 and back at every step (the weight stays put: its update is zero), over
    `steps` retraining steps, with or without freezing."""
    values = torch.tensor([-1.0, 1.0, -1.0])
    weight = torch.nn.Parameter(values.clone())
    latent = [values.clone()]
    alloc = Allocation([torch.ones(3, dtype=torch.bool)], torch.tensor([1]), [torch.tensor([-1.0, 1.0])],
                       [torch.tensor([0, 1, 0])], [values.clone()], 3.0, 0.0, 0.0)
    found = []
    for t in range(steps):
        latent[0][2] = 0.01 if t % 2 == 0 else -0.01
        snap([weight], alloc, latent, oscillations)
        found.append(int(alloc.codes[0][2]))
    return found


def test_a_code_that_keeps_flipping_back_while_retraining_is_frozen():
    """Without freezing the weight changes code at every one of 40 steps; with it (oscillations.py)
    it stops within 20 steps and holds one code for good, while the two weights that did not
    move keep theirs."""
    free = retraining_codes(None, 40)
    assert all(a != b for a, b in zip(free, free[1:]))
    oscillations = Oscillations([torch.tensor([0, 1, 0])])
    frozen = retraining_codes(oscillations, 40)
    assert len(set(frozen[20:])) == 1
    assert oscillations.frozen[0].tolist() == [False, False, True]


def test_a_run_says_how_many_codes_its_retraining_froze(trained_mlp, digits):
    """At 800x the digits MLP's layers get 1 or 2 bits and some codes flip back and forth while
    retraining (over the 15 epochs of the CLI's default, about a hundred steps): the record of the epoch in which the final phase starts says how many of the
    kept weights' codes were frozen, and no other record says it."""
    engine = Engine(copy.deepcopy(trained_mlp), digits, EngineConfig(target="800x", epochs=15, device="cpu"))
    epochs = [r for r in engine if isinstance(r, EpochRecord)]
    said = [r for r in epochs if "froze" in r.note]
    assert len(said) == 1 and said[0].phase == "finetune"
    frozen, kept = (int(n.replace(",", "")) for n in re.search(r"froze ([\d,]+) of ([\d,]+) codes", said[0].note).groups())
    assert 0 < frozen < kept == sum(layer.nnz for layer in epochs[-1].layers)


def test_a_code_that_moves_one_way_is_never_frozen():
    """A weight that climbs through every centre of a 2-bit codebook, one code every step, changes
    direction never: it is not frozen and ends at the top centre."""
    oscillations = Oscillations([torch.tensor([0])])
    codes = [int(oscillations.follow(0, torch.tensor([min(t, 3)]))) for t in range(200)]
    assert codes[:4] == [0, 1, 2, 3] and codes[-1] == 3
    assert not oscillations.frozen[0].any()


@pytest.mark.parametrize("steps, every", [(100, 7), (60, 1), (1000, 250), (9, 10)])
def test_schedule_puts_each_phase_on_a_projection_step_at_its_share_of_the_run(steps, every):
    schedule = Schedule(steps, every, retrain=0.3, finetune=0.3)
    retrain, finetune = schedule.retrain_start, schedule.finetune_start
    if -(-steps // every) < 2:  # a single projection interval: no room for later phases
        assert retrain == finetune == -1
        return
    assert schedule.projects(retrain) and schedule.projects(finetune)
    assert 0 < retrain <= finetune < steps
    assert abs((steps - retrain) - 0.6 * steps) <= every
    assert abs((steps - finetune) - 0.3 * steps) <= every
    assert Schedule(steps, every, retrain=0.3, finetune=0.0).finetune_start == -1
