"""Compression without training (method posttrain): every kind of model the defaults cover
compresses to its target from calibration inputs, the file reloads exactly and runs in C as in
PyTorch, options priced by output error beat magnitude where inputs are far from isotropic, and
the command line does it with one clear line for bad input."""
from __future__ import annotations

import copy
import itertools
import json
import logging
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import jointcomp
from jointcomp import EngineConfig, Engine, whatif
from jointcomp.budget import BIT_CHOICES, Budget
from jointcomp.deploy.c import export_c
from jointcomp.methods import posttrain
from jointcomp.models import build_model
from jointcomp.trainer import calibration_inputs, train_dense
from c_runtime import compile_c, run_c
from command import refused
from sizes import fits
from test_defaults import MODELS, conv_bn, subset

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", MODELS)
def test_posttrain_compresses_every_kind_of_model_to_its_target(name, tmp_path):
    data_name, build = MODELS[name]
    data = subset(jointcomp.load_dataset(data_name))
    torch.manual_seed(0)
    start = build(data)
    for target in ("10x", "200x") if name in ("mlp", "lenet5", "conv-bn factory") else ("50x",):
        model = copy.deepcopy(start)
        engine = Engine(model, data, EngineConfig(target=target, method="posttrain", calibration=64, device="cpu"))
        records = list(engine)
        assert [r.kind for r in records] == ["start", "final"]  # no training step, no epoch
        path = tmp_path / f"{target}.jcz"
        engine.export(str(path))
        assert fits(path, target, start), target
        reloaded = jointcomp.load_compressed(str(path), model=build(data)).eval()
        engine.compressor.convert_()
        with torch.no_grad():
            assert torch.equal(reloaded(data.val_x[:64]), model.eval()(data.val_x[:64]))
        if name in ("lenet5", "conv-bn factory"):  # the C export of a reconstructed, BatchNorm-re-estimated model
            export_c(str(path), tmp_path / "c", model=build(data), input_shape=data.input_shape)
            ours = run_c(compile_c(tmp_path / "c"), data.val_x[:100])
            with torch.no_grad():
                assert (ours - reloaded(data.val_x[:100])).abs().max().item() <= 1e-4


class TiedLanguageModel(nn.Module):
    """A token embedding read out again by the head with the same tensor (a GPT's tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 24)
        self.mix = nn.Linear(24, 24)
        self.head = nn.Linear(24, 32, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mix(self.embed(tokens))))


def test_a_tied_embedding_and_head_compress_once_without_training(tmp_path):
    """A user's language model through the Python API, from a list of token batches: the tied tensor
    is one compressed layer (counted once), the model fits its target, and the file reloads into a
    model whose embedding and head are still one tensor giving the same outputs."""
    torch.manual_seed(0)
    model = TiedLanguageModel()
    batches = [torch.randint(32, (16, 12)) for _ in range(4)]
    comp = jointcomp.Compressor(model, "8x", method="posttrain")
    assert comp.names == ["mix.weight", "head.weight"]
    comp.calibrate(batches)
    final = comp.finish()
    assert final.size_bits <= comp.target_bits == 32 * (24 * 24 + 32 * 24) / 8
    comp.convert_()
    path = tmp_path / "tied.jcz"
    comp.export(str(path))
    reloaded = jointcomp.load_compressed(str(path), model=TiedLanguageModel())
    assert reloaded.head.weight is reloaded.embed.weight
    with torch.no_grad():
        assert torch.equal(reloaded(batches[0]), model(batches[0]))


def test_calibrated_options_beat_magnitude_on_inputs_far_from_isotropic():
    """One linear layer whose input features have scales from 0.01 to 10: magnitude (admm's
    untrained projection) keeps the large weights of quiet inputs; posttrain prices each option
    by what it does to the output and reconstructs the rest, at the same size."""
    torch.manual_seed(0)
    scales = torch.logspace(-2, 1, 64)
    x = torch.randn(2048, 64) * scales
    layer = nn.Linear(64, 32, bias=False)
    dense = layer.weight.detach().clone()

    def output_error(method: str) -> tuple[float, float]:
        model = copy.deepcopy(nn.Sequential(layer))
        comp = jointcomp.Compressor(model, "16x", steps=1, method=method)
        if method == "posttrain":  # (calibrate() would start admm from the post-training result)
            comp.calibrate(x.split(256))
        final = comp.finish()
        comp.convert_()
        with torch.no_grad():
            return float((model(x) - x @ dense.T).square().mean()), final.size_bits

    calibrated, calibrated_size = output_error("posttrain")
    magnitude, magnitude_size = output_error("admm")
    target = 32 * dense.numel() / 16
    assert calibrated_size <= target and magnitude_size <= target
    assert calibrated < 0.25 * magnitude, (calibrated, magnitude)


class DoublesItsInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2).relu()


class InPlaceResidual(nn.Module):
    """What a recorded pass must not answer for: a module that changes its input in place and returns
    it (ReLU), one that returns it (Identity), one that changes it and returns another tensor, their
    inputs read again after; a convolution's output changed in place and read again later, a module
    called three times, a weight used twice at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.skip = nn.Identity()
        self.doubler = DoublesItsInput()
        self.body = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.stem(x).add_(0.5)
        out = self.act(pre) + pre
        self.skip(out).mul_(2)
        out = self.doubler(out) + out
        out += self.body(out)
        out = out + self.body(self.act(out.clone()))
        out = out + self.norm(self.body(out)).relu_()
        return self.head(out.mean((2, 3))) + self.head(out.amax((2, 3)))


@pytest.mark.parametrize("network", ["in place", "tied", "resnet20"])
def test_a_sensitivity_is_the_same_when_the_layers_before_the_change_are_not_computed_again(network):
    """The sensitivities measured with the dense pass's recorded calls answering for every call that
    ended before the changed weight's first use (`RecordedPass`) are exactly those measured computing
    the whole pass each time (no room to record outputs); and they differ from layer to layer (the
    measure is not constant). The model's modules are left with their own forward after."""
    torch.manual_seed(0)
    model, x = {"in place": (InPlaceResidual(), torch.randn(8, 1, 6, 6)),
                "tied": (TiedLanguageModel(), torch.randint(32, (8, 12))),
                "resnet20": (build_model("resnet20", (3, 32, 32), 10), torch.randn(4, 3, 32, 32))}[network]
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
    params = [p for n, p in model.named_parameters() if p.dim() > 1]
    hessians = [torch.eye(p[0].numel(), dtype=torch.float64)[None] for p in params]
    replayed = posttrain._sensitivities(model, params, hessians, [x, x[:3]])
    computed = posttrain._sensitivities(model, params, hessians, [x, x[:3]], bound=0)
    assert replayed == computed
    assert len(set(computed)) == len(computed)
    assert all(m.__dict__.get("forward") is None for m in model.modules())


def test_each_column_is_rounded_after_the_corrections_of_those_before():
    """GPTQ's column loop: every kept weight a codebook value, every pruned one zero; the first
    column rounded as given (nothing before it to correct), later ones after the errors of those
    before them moved them: a plain rounding of the dense weights is farther from them in output."""
    torch.manual_seed(0)
    w = torch.randn(1, 8, 40)
    x = torch.randn(400, 10) @ torch.randn(10, 40) + 0.1 * torch.randn(400, 40)  # correlated inputs: errors can be made up
    h = (x.T @ x)[None].double() / 400
    mask = torch.rand(w.shape) < 0.5
    book = torch.tensor([-1.0, -0.2, 0.3, 1.5])
    q, kept = posttrain._round_columns(w, mask, posttrain._damped_inverse_factor(h).float(), book[None],
                                      torch.zeros(8, dtype=torch.long))
    plain = torch.where(kept, book[(w[..., None] - book).abs().argmin(-1)], 0.0)
    assert torch.equal(q[:, :, 0], plain[:, :, 0])
    assert torch.isin(q[kept], book).all() and (q[~kept] == 0).all() and torch.equal(kept.sum(-1), mask.sum(-1))

    def output_error(v: torch.Tensor) -> float:
        return float(torch.einsum("grd,gde,gre->", (w - v).double(), h, (w - v).double()))
    assert output_error(q) < 0.8 * output_error(plain)


@pytest.mark.parametrize("codebooks", [300, 1])
def test_the_nearest_centre_of_each_row_is_found_as_a_plain_comparison_finds_it(codebooks):
    """The column loop finds each value's nearest centre among its own codebook's midpoints with one
    searchsorted (over all codebooks, float order as integer keys, rows sharing codebooks; or over
    the one codebook's midpoints): the index in all the centres of its codebook's first centre plus
    the count of its midpoints <= the value, for values on a midpoint, at -0.0 and 0.0, and tiny,
    equal or repeated centres."""
    import numpy

    rng = numpy.random.default_rng(0)
    odd = numpy.array([-1.5, -0.3, -0.0, 0.0, 0.2, 0.2, 1e-30, -1e-30, 3.0], dtype=numpy.float32)
    books = numpy.sort(numpy.concatenate([rng.choice(odd, (codebooks, 12)), rng.standard_normal((codebooks, 4))], 1), 1)
    books = books.astype(numpy.float32)
    mids = (books[:, :-1] + books[:, 1:]) / 2
    rows = rng.integers(0, len(mids), 1000)  # each value's codebook
    nearest = posttrain._nearest_centre(books, rows)
    for _ in range(20):
        on_mid = mids[rows, rng.integers(0, mids.shape[1], len(rows))]
        values = numpy.where(rng.random(len(rows)) < 0.5, on_mid, rng.standard_normal(len(rows)))
        values = numpy.where(rng.random(len(rows)) < 0.1, -0.0, values).astype(numpy.float32)
        assert numpy.array_equal(nearest(values), rows * books.shape[1] + (mids[rows] <= values[:, None]).sum(1))


def test_the_layers_codebooks_fitted_together_are_each_the_one_fitted_alone():
    """A candidate's layers get their codebooks in one batched fit: each the very codebook its layer's
    kept weights get alone (sets of every size: exact below EXACT_BELOW values, Lloyd's above, one
    value, fewer values than centres), so batching changes no result."""
    torch.manual_seed(0)
    weights = [torch.randn(shape) * scale for shape, scale in
               [((20, 1, 5, 5), 0.3), ((500, 800), 0.02), ((50, 20, 5, 5), 0.05), ((10, 500), 0.1), ((4, 4), 1.0)]]
    masks = [torch.rand(w.shape) < keep for w, keep in zip(weights, (0.5, 0.05, 0.2, 0.9, 0.0))]
    masks[-1][0, 0] = True  # a layer keeping one weight
    bits = torch.tensor([2, 3, 5, 8, 1])
    together = posttrain.layer_codebooks(weights, masks, bits)
    for w, m, b, book in zip(weights, masks, bits, together):
        alone = posttrain.layer_codebooks([w], [m], b[None])[0]
        assert book.numel() == 2 ** int(b) and torch.equal(book, alone)


def test_each_block_keeps_the_weights_the_corrections_before_it_made_large():
    """SparseGPT's adaptive mask: the second block of columns repeats the first block's inputs, so
    pruning the first block's large weights moves them onto their twins, small in the dense weight.
    Each row keeps in a block as many weights as the mask given, and chooses them when the column
    loop reaches it: the twins, not the weights the mask given kept there."""
    torch.manual_seed(0)
    x = torch.randn(2000, posttrain.BLOCK)
    x = torch.cat([x, x + 0.01 * torch.randn_like(x)], 1)
    h = (x.T @ x)[None].double() / len(x)
    w = 0.05 * torch.randn(1, 4, 2 * posttrain.BLOCK)
    w[:, :, :32] = 1.0
    mask = torch.zeros(w.shape, dtype=torch.bool)
    mask[:, :, posttrain.BLOCK + 64:posttrain.BLOCK + 96] = True
    book = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
    _, kept = posttrain._round_columns(w, mask, posttrain._damped_inverse_factor(h).float(), book[None],
                                        torch.zeros(4, dtype=torch.long))
    assert kept[:, :, posttrain.BLOCK:posttrain.BLOCK + 32].all() and torch.equal(kept.sum(-1), mask.sum(-1))


@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (1, 16), (6, 16)], ids=["depthwise", "one-output", "six-rows"])
def test_reconstructing_a_layer_leaves_the_weight_it_is_given_as_it_was(shape):
    """`reconstruct_layer` gives a new weight and leaves the one it starts from as it was, also where
    each group of the layer has one row (a depthwise convolution, a Linear layer of one output): there
    the column loop's transposed copy of the weight would be the weight's own memory."""
    torch.manual_seed(0)
    weight = torch.randn(shape)
    groups, columns = (shape[0], 9) if len(shape) == 4 else (1, shape[1])
    x = torch.randn(groups, 300, columns)
    h = torch.einsum("gnc,gnd->gcd", x, x) / 300
    given = weight.clone()
    _, q, kept = posttrain.reconstruct_layer(weight, h, torch.rand(shape) < 0.5, 2)
    assert torch.equal(weight, given)
    assert not torch.equal(q, weight) and (q[~kept] == 0).all()


def test_the_what_ifs_leave_a_network_of_depthwise_convolutions_dense(digits):
    """Compressing without training at two targets touches none of the weights it compresses from
    (the app's what-ifs ask again and again of the same dense network), depthwise layers included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 8 * 8, digits.num_classes))
    dense = copy.deepcopy(model.state_dict())
    comp = jointcomp.Compressor(model, "20x", method="posttrain")
    comp.calibrate(calibration_inputs(digits, 128, seed=0, device=torch.device("cpu")))
    for target in ("20x", "60x"):
        whatif.plan(comp, target)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())


def test_moments_of_few_inputs_are_shrunk_towards_the_truth_and_of_many_left_alone():
    """H of a Linear layer from fewer calibration inputs than it has columns is a noisy estimate of
    its inputs' true second moments: shrunk (Ledoit-Wolf) it is closer to them than the sample's own;
    from many inputs it is left as measured. Cross and H are shrunk alike (a ridge towards W)."""
    torch.manual_seed(0)
    columns = 200
    mix = torch.randn(columns, 20) / 20 ** 0.5
    truth = (mix @ mix.T + 0.1 * torch.eye(columns)).double()
    layer = nn.Linear(columns, 1)
    for count in (50, 20000):
        x = torch.randn(count, 20) @ mix.T + 0.1 ** 0.5 * torch.randn(count, columns)
        cross, h = posttrain._mean_moments([(layer, x, x)])
        sample = (x.T.double() @ x.double()) / count
        assert torch.allclose(cross, h)
        if count < columns:
            assert (h[0] - truth).norm() < 0.95 * (sample - truth).norm()
        else:
            assert (h[0] - sample).norm() < 0.01 * sample.norm()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # torch's own, for the asymmetric case
@pytest.mark.parametrize("conv", [nn.Conv2d(3, 8, 5), nn.Conv2d(8, 12, 3, stride=2, padding=1),
                                  nn.Conv2d(8, 8, 3, dilation=2, padding=2), nn.Conv2d(8, 12, 3, groups=4, padding=1),
                                  nn.Conv2d(6, 6, (3, 5), stride=(1, 2), padding=(1, 0), dilation=(2, 1)),
                                  nn.Conv2d(4, 6, 4, padding="same"), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                  nn.Conv2d(4, 4, 3, padding=2, padding_mode="circular", dilation=2)])
def test_a_convolutions_input_rows_times_its_weight_are_its_output(conv):
    """The rows every moment H = X^T X is made of: each output position's patch (its columns in
    (kernel row, kernel column, channel) order), for strided, dilated, grouped and rectangular
    convolutions and every padding; and their moment in the weight's order prices the weight's
    output: tr(W H W^T) is the energy of the convolution's output."""
    torch.manual_seed(0)
    x = torch.randn(3, conv.in_channels, 11, 9)
    g = conv.groups
    rows = posttrain._layer_inputs(conv, x)
    found = rows @ conv.weight.permute(0, 2, 3, 1).reshape(g, conv.out_channels // g, -1).transpose(1, 2)
    out = conv(x) - conv.bias[:, None, None]
    n, channels, height, width = out.shape
    expected = out.view(n, g, channels // g, height, width).permute(1, 0, 3, 4, 2).reshape(g, n * height * width, -1)
    assert torch.allclose(found, expected, atol=1e-5)
    h = posttrain._in_weight_order(conv, rows.transpose(1, 2).double() @ rows.double())
    w = conv.weight.detach().double().reshape(g, conv.out_channels // g, -1)
    energy = torch.einsum("grd,gde,gre->", w, h, w)
    assert torch.allclose(energy, out.double().square().sum(), rtol=1e-6)


def _conv_bn_on_digits(digits):
    torch.manual_seed(0)
    model = conv_bn(digits.input_shape, digits.num_classes)
    for _ in train_dense(model, digits, EngineConfig(device="cpu"), epochs=5):
        pass
    return model


@pytest.mark.parametrize("network, closer", [("mlp", 0.5), ("conv-bn", 0.9)])
def test_reconstructing_in_order_makes_up_for_the_layers_before(network, closer, trained_mlp, digits):
    """At 200x the first layers lose much: reconstructing each later layer on the inputs the
    compressed layers before it give, aimed at the dense layer's outputs, brings the network's
    outputs closer to the dense network's than reconstructing each on its dense inputs, with the
    same masks and bits. With BatchNorm, only if each layer's inputs are normalized as they will be
    (the statistics before it moved first): aimed through stale statistics, this conv-BN network's
    outputs ended 6x farther than on dense inputs. The first layer, which nothing compressed comes
    before, is the same in both."""
    model = trained_mlp if network == "mlp" else _conv_bn_on_digits(digits)
    comp = jointcomp.Compressor(model, "200x", method="posttrain")
    inputs = calibration_inputs(digits, 256, seed=0, device=torch.device("cpu"))
    comp.calibrate(inputs)
    budget = Budget(comp.target_bits)
    drafted = comp.method.draft(budget)
    on_dense, apart = comp.method.reconstruct(drafted.masks, drafted.bits, budget, in_order=False)
    layered, in_order = comp.method.reconstruct(drafted.masks, drafted.bits, budget, in_order=True)
    alloc = comp.method.allocate(budget)
    assert in_order < closer * apart, (in_order, apart)
    assert torch.equal(layered.values[0], on_dense.values[0]) and torch.equal(layered.codebooks[0], on_dense.codebooks[0])
    assert not torch.equal(layered.values[-1], on_dense.values[-1])
    assert _distance(model, comp.names, alloc, torch.cat(inputs)) == pytest.approx(in_order, rel=1e-4)  # what allocate gives


def test_a_reconstruction_is_remembered_for_its_very_masks_not_for_masks_of_as_many_weights(trained_mlp, digits):
    """`reconstruct` remembers its latest results: masks that keep as many weights in each layer, in
    other places, get a reconstruction of their own (the codebook fitted to the weights they keep),
    not one remembered for other masks."""
    comp = jointcomp.Compressor(trained_mlp, "50x", method="posttrain")
    comp.calibrate(calibration_inputs(digits, 256, seed=0, device=torch.device("cpu")))
    budget = Budget(comp.target_bits)
    drafted = comp.method.draft(budget)
    moved = [m.flip(-1) for m in drafted.masks]  # as many kept in every row, at other columns
    assert all(not torch.equal(a, b) for a, b in zip(moved, drafted.masks))
    again, _ = comp.method.reconstruct(moved, drafted.bits, budget, in_order=False)
    w, h = comp.method.params[0].detach().float(), comp.method.hessians[0]
    book, values, kept = posttrain.reconstruct_layer(w, h, moved[0], int(drafted.bits[0]))
    assert torch.equal(again.codebooks[0], book) and torch.equal(again.values[0], values)
    assert torch.equal(again.masks[0], kept)


def test_the_uniform_candidate_is_the_uniform_allocation_of_least_table_error(trained_mlp, digits):
    """A draft's third candidate: of the uniform allocations that fit (one bitwidth, one density),
    the one whose option-table errors at its masks' kept counts sum least; its masks are made for
    it alone, and are those `uniform` gives at its bitwidth."""
    comp = jointcomp.Compressor(copy.deepcopy(trained_mlp), "50x", method="posttrain")
    comp.calibrate(calibration_inputs(digits, 256, seed=0, device=torch.device("cpu")))
    method, budget = comp.method, Budget(comp.target_bits)
    fits = [found for b in BIT_CHOICES if (found := method.uniform(b, budget)) is not None]
    assert len(fits) > 1

    def table_error(masks: list[torch.Tensor], bits: torch.Tensor) -> float:
        return sum(posttrain._table_error(keeps, errors, int(m.sum()), int(b))
                   for (keeps, errors), m, b in zip(method.tables.layers, masks, bits))

    masks, bits = min(fits, key=lambda found: table_error(*found))
    chosen_masks, chosen_bits = method._uniform_candidate(budget)
    assert torch.equal(chosen_bits, bits) and all(torch.equal(a, b) for a, b in zip(chosen_masks, masks))


def test_the_allocation_at_a_budget_just_drafted_takes_that_draft(trained_mlp, digits, monkeypatch):
    """A what-if or a run searches its budget on drafts, then allocates at the budget found: the
    draft's candidates (two projections and three reconstructions) are made once for it, and made
    again after a calibration on other inputs, where they give what a fresh calibration gives."""
    made = []  # the budgets a uniform candidate was made for
    uniform = posttrain.PostTrain._uniform_candidate
    monkeypatch.setattr(posttrain.PostTrain, "_uniform_candidate",
                        lambda self, budget: made.append(budget.bits) or uniform(self, budget))
    comp = jointcomp.Compressor(copy.deepcopy(trained_mlp), "100x", method="posttrain")
    comp.calibrate(calibration_inputs(digits, 256, seed=0, device=torch.device("cpu")))
    budget = Budget(comp.target_bits)
    comp.method.draft(budget)
    comp.method.allocate(budget)
    assert len(made) == 1
    other = calibration_inputs(digits, 256, seed=1, device=torch.device("cpu"))
    comp.calibrate(other)
    drafted = comp.method.draft(budget)
    fresh = jointcomp.Compressor(copy.deepcopy(trained_mlp), "100x", method="posttrain")
    fresh.calibrate(other)
    again = fresh.method.draft(budget)
    assert len(made) == 3 and all(torch.equal(a, b) for a, b in zip(drafted.values, again.values))


def _distance(model: nn.Module, names: list[str], alloc, x: torch.Tensor) -> float:
    """Summed squared distance of `model`'s outputs on `x` with `alloc`'s weights and BatchNorm
    statistics from its outputs as it is (a copy takes them)."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        dense = model(x)
        params = dict(model.named_parameters())
        for name, value in zip(names, alloc.values):
            params[name].copy_(value)
        tensors = model.state_dict()
        for name, value in alloc.state.items():
            tensors[name].copy_(value)
        return float((model(x) - dense).square().sum())


def test_a_sketch_takes_three_passes_of_a_batch_and_the_full_result_is_closer(digits):
    """The app's quick what-if on a large network (`sketch`): the option tables' allocation, each layer
    reconstructed on its dense inputs, the BatchNorm statistics chosen on one calibration batch: three
    forward passes of that batch, where `allocate` compares three
    allocations and reconstructs one in order. It fits the same budget, and `allocate`'s outputs
    are closer to the dense network's."""
    model = _conv_bn_on_digits(digits)
    comp = jointcomp.Compressor(model, "200x", method="posttrain")
    inputs = calibration_inputs(digits, 256, seed=0, device=torch.device("cpu"))
    comp.calibrate(inputs)
    budget = Budget(comp.target_bits)
    passes = []
    handle = model.register_forward_pre_hook(lambda module, args: passes.append(len(args[0])))  # copies keep it
    try:
        sketch = comp.method.sketch(budget)
        sketch_passes, passes[:] = list(passes), []
        full = comp.method.allocate(budget)
    finally:
        handle.remove()
    assert sketch_passes == [128, 128, 128] and len(passes) > 9, (sketch_passes, passes)
    assert sketch.size_bits <= budget.bits and full.size_bits <= budget.bits
    x = torch.cat(inputs)
    sketched, allocated = (_distance(model, comp.names, alloc, x) for alloc in (sketch, full))
    assert allocated <= sketched * (1 + 1e-6), (allocated, sketched)
    assert set(sketch.state) == set(full.state) and sketch.state  # its BatchNorm statistics go with it


def test_the_what_if_is_the_methods_own_allocation(trained_mlp):
    """uniform: one bitwidth and one density for all layers; sequential and admm choose per layer."""
    found = {}
    for method in ("admm", "uniform", "sequential"):
        comp = jointcomp.Compressor(copy.deepcopy(trained_mlp), "50x", steps=10, method=method)
        layers = whatif.plan(comp).layers
        found[method] = [(l.bits, l.nnz) for l in layers]
        if method == "uniform":
            assert len({l.bits for l in layers}) == 1
            assert max(l.density for l in layers) - min(l.density for l in layers) < 0.01
    assert found["uniform"] != found["admm"] and found["sequential"] != found["admm"]


def test_posttrain_is_deterministic_and_a_new_target_reuses_the_option_tables(trained_mlp, digits):
    def run(target: str, comp=None):
        comp = comp or jointcomp.Compressor(copy.deepcopy(trained_mlp), target, method="posttrain")
        if comp.method.tables is None:
            comp.calibrate(calibration_inputs(digits, 256, seed=0, device=torch.device("cpu")))
        comp.set_target(target)
        return comp, comp.finish()

    comp, first = run("50x")
    tables = comp.method.tables
    _, again = run("50x")
    assert [(l.bits, l.nnz) for l in first.layers] == [(l.bits, l.nnz) for l in again.layers]
    _, smaller = run("200x", comp)
    assert comp.method.tables is tables  # the slider's move: a knapsack and a reconstruction, no new tables
    assert smaller.size_bits <= comp.resolve("200x") < first.size_bits
    assert comp.method.allocate(Budget(comp.resolve("200x"))).size_bits <= comp.resolve("200x")


@pytest.fixture
def two_threads():
    """torch on two intra-op threads for a test (the suite's workers run on one), then as before."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def threads_of_a_new_thread() -> int:
    later = []
    thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
    thread.start()
    thread.join()
    return later[0]


def test_calibration_gives_torchs_threads_back(trained_mlp, digits, two_threads):
    """The option tables are built in a thread of their own on one intra-op thread while the
    sensitivities take the rest: after it, the caller and every thread started later have torch's
    thread count of before (torch keeps the last count set, by any thread, for threads to come)."""
    comp = jointcomp.Compressor(trained_mlp, "50x", method="posttrain")
    comp.calibrate(calibration_inputs(digits, 256, seed=0, device=torch.device("cpu")))
    assert (torch.get_num_threads(), threads_of_a_new_thread()) == (two_threads, two_threads)


def test_calibration_tells_how_far_it_is_from_the_calling_thread():
    """A ResNet-56's calibration is most of a minute (the app's first what-if): it reports its
    progress to the caller's thread (where a Streamlit bar can be drawn), never going back, from 0
    to 1, several times a layer."""
    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10)
    heard = []
    comp = jointcomp.Compressor(model, "16x", method="posttrain")
    comp.calibrate(torch.randn(64, 3, 32, 32).split(32),
                   lambda fraction, text: heard.append((fraction, text, threading.get_ident())))
    fractions = [f for f, _, _ in heard]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0 and fractions == sorted(fractions)
    assert {thread for _, _, thread in heard} == {threading.get_ident()}
    assert len(comp.specs) == 20 and len(heard) > 2 * 20  # each layer's moments, each sensitivity
    assert "20 layers" in heard[-1][1]


def test_an_allocation_tells_how_far_it_is_layer_by_layer():
    """posttrain's allocation takes as long as its calibration (the button's run on a ResNet-56: a
    minute): it reports each layer of each candidate it compares, then each of the pass in order,
    from the calling thread, never going back, ending at 1."""
    torch.manual_seed(0)
    comp = jointcomp.Compressor(build_model("lenet5", (1, 28, 28), 10), "50x", method="posttrain")
    comp.calibrate(torch.randn(64, 1, 28, 28).split(32), lambda fraction, text: None)
    heard = []
    comp.method.allocate(Budget(comp.resolve("50x")),
                         lambda fraction, text: heard.append((fraction, text, threading.get_ident())))
    fractions = [f for f, _, _ in heard]
    assert fractions == sorted(fractions) and 0 < fractions[0] and fractions[-1] == 1.0
    assert {thread for _, _, thread in heard} == {threading.get_ident()}
    in_order = [text for _, text, _ in heard if "layer by layer" in text]
    assert len(in_order) == 4 and "4 of 4" in in_order[-1]
    compared = [text for _, text, _ in heard if "candidates" in text]
    assert len(compared) + len(in_order) == len(heard) and len(compared) in (2 * 4, 3 * 4)


def test_a_calibration_made_before_on_the_same_inputs_and_weights_is_taken_not_measured_again(monkeypatch):
    """The app's button run compresses what its what-ifs calibrated: the same inputs through a copy
    of the same network. It takes those measurements (a ResNet-56's 40 s) and gives what a calibration
    of its own gives; other inputs, or weights that differ in one value, are measured anew."""
    torch.manual_seed(0)
    model = build_model("lenet5", (1, 28, 28), 10)
    inputs = list(torch.randn(64, 1, 28, 28).split(32))
    first = jointcomp.Compressor(copy.deepcopy(model), "50x", method="posttrain")
    first.calibrate(inputs, lambda fraction, text: None)
    measured = []
    measure = posttrain.PostTrain._calibrate
    monkeypatch.setattr(posttrain.PostTrain, "_calibrate", lambda self, report: measured.append(self) or measure(self, report))

    def calibrated(net: nn.Module, batches: list[torch.Tensor], reuse: jointcomp.Compressor | None = first
                   ) -> jointcomp.Compressor:
        comp = jointcomp.Compressor(net, "50x", method="posttrain")
        comp.calibrate([b.clone() for b in batches], lambda fraction, text: None, reuse=reuse)
        return comp

    taken = calibrated(copy.deepcopy(model), inputs)
    assert measured == []
    own = calibrated(copy.deepcopy(model), inputs, reuse=None)
    assert measured == [own.method]
    budget = Budget(taken.target_bits)
    mine, theirs = taken.method.allocate(budget), own.method.allocate(budget)
    assert all(torch.equal(a, b) for a, b in zip(mine.values, theirs.values))
    assert all(torch.equal(a, b) for a, b in zip(mine.masks, theirs.masks))

    calibrated(copy.deepcopy(model), [torch.randn(32, 1, 28, 28), *inputs[1:]])
    assert len(measured) == 2
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight[0, 0, 0, 0] += 1e-3
    calibrated(other, inputs)
    assert len(measured) == 3


def test_the_what_ifs_measure_what_a_run_of_its_own_measures():
    """The app's what-ifs calibrate in the layout an Engine computes in (channels_last, on a CPU), so
    a what-if is what Compress without training gives to the last bit, and its convolutions run
    at that layout's speed (in the loaded layout a ResNet-20 sweep differed by 0.4 points at 200x,
    and a ResNet-56's what-ifs took 1.2-1.4x as long: BENCHMARKS.md)."""
    from jointcomp.app.runner import what_ifs

    data = subset(jointcomp.load_dataset("fashion-mnist"), train=256, val=512)
    torch.manual_seed(0)
    model = build_model("lenet5", data.input_shape, data.num_classes)
    config = EngineConfig(method="posttrain", target="50x", calibration=64, device="cpu")
    previews = what_ifs(model, data, config, "lenet5")
    engine = Engine(copy.deepcopy(model), data, config)
    final = list(engine)[-1]
    mine, theirs = previews.compressor.method.hessians, engine.compressor.method.hessians
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert previews.plan("50x").accuracy == final.accuracy


class GaveUp(Exception):
    pass


def test_a_calibration_given_up_stops_building_tables_and_gives_torchs_threads_back(monkeypatch, two_threads):
    """The app's rerun (another network picked) stops a calibration at its next progress report:
    the tables' worker stops after the table in hand instead of building the rest on a core the
    next calibration needs, and the calibration ends after it: the worker's count (one thread)
    given back last left every thread started later on one (the app's later what-ifs)."""
    built = []
    build = posttrain._option_table
    monkeypatch.setattr(posttrain, "_option_table", lambda *args: built.append(1) or build(*args))

    def gives_up(fraction: float, text: str) -> None:
        if text.startswith("pricing"):
            raise GaveUp

    torch.manual_seed(0)
    comp = jointcomp.Compressor(build_model("resnet20", (3, 32, 32), 10), "16x", method="posttrain")
    with pytest.raises(GaveUp):
        comp.calibrate(torch.randn(64, 3, 32, 32).split(32), gives_up)
    assert len(built) < len(comp.specs) == 20
    assert (torch.get_num_threads(), threads_of_a_new_thread()) == (two_threads, two_threads)


def test_a_training_set_smaller_than_the_calibration_asked_for_gives_all_and_says_so(digits, caplog):
    """`--calibration 99999` on a set of 1,437 calibrates on all 1,437: said in the run's notes (the
    CLI prints them above its bar), where it used to happen without a word."""
    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger="jointcomp"):
        everything = calibration_inputs(digits, 99999, seed=0, device=cpu)
    assert sum(len(x) for x in everything) == len(digits.train_y)
    assert f"calibrating on all {len(digits.train_y)} training inputs: 99999 were asked for" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jointcomp"):
        some = calibration_inputs(digits, 512, seed=0, device=cpu)
    assert sum(len(x) for x in some) == 512 and "calibrating" not in caplog.text


def cli(*args):
    return subprocess.run([sys.executable, "-m", "jointcomp", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


def test_the_command_compresses_without_training_and_refuses_bad_calibration(tmp_path, capsys):
    out = tmp_path / "run"
    result = cli("compress", "--model", "mlp", "--data", "digits", "--dense-epochs", "10", "--method", "posttrain",
                 "--target", "50x", "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_bits"] <= summary["target_bits"]
    assert summary["accuracy"] >= summary["dense_accuracy"] - 0.05
    evaluated = cli("evaluate", out / "model.jcz", "--data", "digits").stdout
    assert f"accuracy {summary['accuracy']:.4f}" in evaluated
    for method, value in itertools.product(("posttrain", "admm --start calibrated"), ("0", "8")):
        says = "needs at least 16 calibration inputs, got " + value  # the minimum that applies, even to 0
        assert says in refused(capsys, "compress", "--model", "mlp", "--data", "digits", "--dense-epochs", "10", "--method",
                               *method.split(), "--calibration", value, "--out", tmp_path / "bad")  # before the dense epochs
    with pytest.raises(ValueError, match="calibration must be at least 1 input, got 0"):
        EngineConfig(calibration=0)  # a dense start has no minimum of its own
    few = cli("compress", "--model", "mlp", "--data", "digits", "--dense-epochs", "0", "--epochs", "1", "--calibration", "8",
              "--out", tmp_path / "few")  # a dense start measures BatchNorm on as few as it is given
    assert few.returncode == 0, few.stderr[-2000:]


def test_calibration_that_would_keep_too_many_layer_inputs_is_refused_in_one_line(trained_mlp, digits, monkeypatch):
    """The dense network's layer inputs are kept for every calibration input (what each layer is
    reconstructed towards): past DENSE_RECORD_BOUND bytes the calibration is refused, saying how to
    fix it, before anything large is allocated."""
    from jointcomp.methods import posttrain
    inputs = calibration_inputs(digits, 512, 0, torch.device("cpu"))
    kept = 512 * 4 * sum(m.in_features for m in trained_mlp.modules() if isinstance(m, nn.Linear))
    monkeypatch.setattr(posttrain, "DENSE_RECORD_BOUND", kept - 1)
    with pytest.raises(ValueError, match=r"512 calibration inputs would keep .* give fewer \(--calibration N\)"):
        jointcomp.Compressor(copy.deepcopy(trained_mlp), "50x", method="posttrain").calibrate(inputs)
    monkeypatch.setattr(posttrain, "DENSE_RECORD_BOUND", kept)
    jointcomp.Compressor(copy.deepcopy(trained_mlp), "50x", method="posttrain").calibrate(inputs)


def test_a_run_without_training_builds_no_optimizer_and_resumes(tmp_path):
    """An optimizer is only built where something trains: torch imports its compiler for the first
    one (1.5 s of a 45 s ResNet-20 run). The state such a run saves, without an optimizer, resumes
    to the same result. In a process of its own, so that nothing else has imported the compiler."""
    script = f"""
import sys, torch, jointcomp
from jointcomp import Engine, EngineConfig
from jointcomp.models import build_model
data = jointcomp.load_dataset("digits")
config = EngineConfig(method="posttrain", target="50x", calibration=64, device="cpu")
torch.manual_seed(0)
first = list(Engine(build_model("mlp", data.input_shape, data.num_classes), data, config,
                    run_dir={str(tmp_path / "run")!r}))[-1]
print("torch._dynamo" in sys.modules)
torch.manual_seed(1)
resumed = list(Engine(build_model("mlp", data.input_shape, data.num_classes), data, config,
                      run_dir={str(tmp_path / "run")!r}, resume=True))[-1]
print(first.accuracy == resumed.accuracy, first.size_bits == resumed.size_bits)
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["False", "True", "True"], result.stdout
