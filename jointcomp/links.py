"""Which compressed layer feeds which, unit by unit, and the weights a pruning makes useless.

When every kept weight into a unit (an output feature or channel of a layer) is pruned,
the unit puts out a constant (its bias, through ReLU, pooling, BatchNorm...). The weights of
the next layer that read it then only add a constant: they cost budget and carry nothing.
At high ratios this is no corner case: the first projection of LeNet-5 at 2000x leaves 292
of its 500 hidden units without an input, and 1,044 of the 2,160 weights kept in the last
layer read them. `Links` finds those weights so that the projection can spend their budget
on weights that matter.

Links are found by tracing the model (torch.fx): a layer feeds the next compressed layer
when only unit-wise operations lie between them (activations, pooling, BatchNorm, dropout,
flattening of channels). Anything else (an addition, a concatenation, a model that does not
trace) makes no link, so the projection is then exactly what it was without one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

UNITWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity,
)
UNITWISE_FUNCTIONS = (
    torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu, nn.functional.silu,
    nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d,
)
UNITWISE_METHODS = ("relu", "tanh", "sigmoid")


@dataclass(frozen=True)
class Link:
    """Layer `sink` reads the units of layer `source`: its input feature (Linear) or
    channel (Conv) i comes from unit i // `block` of the source."""

    source: int
    sink: int
    block: int


class Links:
    """The unit-to-unit links between a model's compressed layers."""

    def __init__(self, links: list[Link]) -> None:
        self.links = links

    @classmethod
    def of(cls, model: nn.Module, names: list[str]) -> "Links":
        """The links between the layers whose weights are `names` (as in `named_parameters`)."""
        layers = {name.removesuffix("weight").removesuffix("."): i for i, name in enumerate(names)}
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception:  # a model fx cannot trace: no links, the plain projection
            return cls([])
        modules = dict(model.named_modules())
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target in layers]
        once = {t for t in layers if sum(n.target == t for n in calls) == 1}  # a layer read twice reads two things
        found = []
        for node in calls:
            sink = _next_layer(node, layers, modules)
            if sink is not None and sink.target in once:
                block = _block(modules[node.target], modules[sink.target])
                if block:
                    found.append(Link(layers[node.target], layers[sink.target], block))
        return cls(found)

    def useless(self, masks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per layer, the weights that read a unit left without inputs by `masks` (in model
        order, so that a unit fed only by useless weights counts as without inputs too)."""
        useless = [torch.zeros_like(m) for m in masks]
        for link in sorted(self.links, key=lambda k: k.source):
            kept = masks[link.source] & ~useless[link.source]
            dead = ~kept.flatten(1).any(dim=1)  # units (output rows) without a kept input
            reads_dead = dead.repeat_interleave(link.block)
            shape = [1] * masks[link.sink].dim()
            shape[1] = -1
            useless[link.sink] |= reads_dead.view(shape).expand_as(masks[link.sink])
        return useless


def _next_layer(node: fx.Node, layers: dict[str, int], modules: dict[str, nn.Module]) -> fx.Node | None:
    """The compressed layer that alone reads `node`'s output, through unit-wise operations only."""
    while len(node.users) == 1:
        (node,) = node.users
        if len(node.all_input_nodes) != 1:
            return None
        if node.op == "call_module" and node.target in layers:
            return node
        if not _unitwise(node, modules):
            return None
    return None


def _unitwise(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` maps each unit (channel) of its input to the same unit alone."""
    flattens = node.args[1:] == (1,) and not node.kwargs  # flatten(x, 1): channels stay in order
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Flatten):
            return module.start_dim == 1 and module.end_dim == -1
        return isinstance(module, UNITWISE_MODULES)
    if node.op == "call_function":
        return flattens if node.target is torch.flatten else node.target in UNITWISE_FUNCTIONS
    if node.op == "call_method":
        return flattens if node.target == "flatten" else node.target in UNITWISE_METHODS
    return False


def _block(source: nn.Module, sink: nn.Module) -> int:
    """How many consecutive inputs of the sink each unit of the source feeds; 0 where the
    shapes do not say (a convolution's channels flatten into blocks of H x W features; a
    Linear layer's units must map one to one, as a flattened sequence would interleave them)."""
    if isinstance(source, nn.Linear):
        units = source.out_features
        inputs = sink.in_features if isinstance(sink, nn.Linear) else 0
        return 1 if inputs == units else 0
    units = source.out_channels
    if isinstance(sink, nn.Conv2d):
        return 1 if sink.groups == 1 and sink.in_channels == units else 0
    return sink.in_features // units if sink.in_features % units == 0 else 0
