"""Links between layers (which layer reads which one's units) and the pruning that spends no
budget on weights reading a unit without inputs."""
import torch
from torch import nn

from jointcomp import build_model
from jointcomp.projector import LayerSpec, Projector
from jointcomp.budget import Budget, Accounting
from jointcomp.compressor import CompressorConfig, compressible_weights
from jointcomp.links import find_links
from jointcomp.solvers import Link, useless_weights


def links_of(model):
    names = [name for name, _, _ in compressible_weights(model, CompressorConfig())]
    return find_links(model, names)


def test_links_follow_unitwise_operations_and_stop_at_anything_else():
    lenet = build_model("lenet5", (1, 28, 28), 10)  # conv, pool, conv, pool, flatten, fc, relu, fc
    assert links_of(lenet) == [Link(0, 1, 1), Link(1, 2, 16), Link(2, 3, 1)]  # 50 channels x 4 x 4 = 800 inputs

    resnet = build_model("resnet20", (3, 32, 32), 10)
    links = links_of(resnet)
    # inside each block conv1 -> bn -> relu -> conv2 (18 blocks... 9); the stem feeds a block and its
    # shortcut, and every conv2 meets the shortcut in an addition: no links there
    assert len(links) == 9 and all(link.sink == link.source + 1 and link.block == 1 for link in links)

    class Shared(nn.Module):  # one layer applied twice reads two different inputs
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + self.b(x)

    assert links_of(Shared()) == []

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(self.a(x)) if x.sum() > 0 else x  # control flow on data: fx cannot trace it

    assert links_of(Untraceable()) == []

    class LastDim(nn.Module):  # a Linear layer on a convolution's output reads its last dimension, not channels
        def __init__(self):
            super().__init__()
            self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(8, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)))

    assert links_of(LastDim()) == []


def test_useless_weights_read_units_without_inputs_in_cascade():
    links = [Link(0, 1, 1), Link(1, 2, 2)]
    first = torch.ones(3, 5, dtype=torch.bool)
    first[1] = False  # unit 1 of layer 0 has no input
    second = torch.ones(2, 3, dtype=torch.bool)
    second[0, 0] = second[0, 2] = False  # unit 0 of layer 1 reads only unit 1 of layer 0
    third = torch.ones(4, 4, dtype=torch.bool)  # reads layer 1's 2 units in blocks of 2 inputs
    useless = useless_weights([first, second, third], links)
    assert not useless[0].any()
    assert useless[1].tolist() == [[False, True, False], [False, True, False]]
    assert useless[2].tolist() == [[True, True, False, False]] * 4  # unit 0 of layer 1 is without inputs too


def test_pruning_spends_nothing_on_weights_reading_units_without_inputs(trained_mlp):
    names = ["1.weight", "3.weight", "5.weight"]  # 64 -> 256 -> 128 -> 10
    weights = [trained_mlp.get_submodule(n[0]).weight.detach() for n in names]
    specs = [LayerSpec(n, tuple(w.shape)) for n, w in zip(names, weights)]
    links = find_links(trained_mlp, names)
    assert links == [Link(0, 1, 1), Link(1, 2, 1)]
    bits, budget = torch.tensor([1, 1, 1]), Budget(400)  # about 1300x: a few hundred weights at one bit

    def reading_dead(masks):
        return sum(int((m & u).sum()) for m, u in zip(masks, useless_weights(masks, links)))

    plain, _ = Projector(specs, Accounting()).prune(weights, bits, budget)
    aware, _ = Projector(specs, Accounting(), links=links).prune(weights, bits, budget)
    assert reading_dead(plain) > 10  # the budget the plain projection wastes
    assert reading_dead(aware) == 0
    kept = sum(int(m.sum()) for m in aware)
    assert kept == sum(int(m.sum()) for m in plain) == 400  # the same budget, spent on weights that matter
