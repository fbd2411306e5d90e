"""Which compressed layer feeds which, unit by unit: what makes weights useless after a pruning.

When every kept weight into a unit (an output feature or channel of a layer) is pruned,
the unit puts out a constant (its bias, through ReLU, pooling, BatchNorm...). The weights of
the next layer that read it then only add a constant: they cost budget and carry nothing.
At high ratios this is no corner case: the first projection of LeNet-5 at 2000x leaves 292
of its 500 hidden units without an input, and 1,044 of the 2,160 weights kept in the last
layer read them. This file finds the links; `solvers.useless_weights` finds, from them and the masks, the
weights the projection then gives to others.

Links are found by tracing the model (torch.fx): a layer feeds the next compressed layer
when only unit-wise operations lie between them (activations, BatchNorm, dropout; pooling and
flattening of a convolution's channels). Anything else (an addition, a concatenation, a model that does not
trace) makes no link, so the projection is then exactly what it was without one.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from .solvers import Link

ELEMENTWISE_MODULES = (  # a constant unit stays a constant, whatever the layout
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout, nn.Identity,
)
ELEMENTWISE_FUNCTIONS = (
    torch.relu, torch.tanh, torch.sigmoid, nn.functional.relu, nn.functional.gelu, nn.functional.silu,
)
ELEMENTWISE_METHODS = ("relu", "tanh", "sigmoid")
POOL_MODULES = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)  # per channel of (N, C, H, W)
POOL_FUNCTIONS = (nn.functional.max_pool2d, nn.functional.avg_pool2d, nn.functional.adaptive_avg_pool2d)


def find_links(model: nn.Module, names: list[str]) -> list[Link]:
    """The links between the layers whose weights are `names` (as in `named_parameters`)."""
    layers = {name.removesuffix("weight").removesuffix("."): i for i, name in enumerate(names)}
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # a model fx cannot trace: no links, the plain projection
        return []
    modules = dict(model.named_modules())
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in layers]
    once = {t for t in layers if sum(n.target == t for n in calls) == 1}  # a layer read twice reads two things
    found = []
    for node in calls:
        sink, kinds = _next_layer(node, layers, modules)
        if sink is not None and sink.target in once:
            block = _block(modules[node.target], modules[sink.target], kinds)
            if block:
                found.append(Link(layers[node.target], layers[sink.target], block))
    return found


def _next_layer(node: fx.Node, layers: dict[str, int], modules: dict[str, nn.Module]) -> tuple[fx.Node | None, set[str]]:
    """The compressed layer that alone reads `node`'s output through unit-wise operations
    only (None if there is none), and the kinds of those operations (`_kind`)."""
    kinds: set[str] = set()
    while len(node.users) == 1:
        (node,) = node.users
        if len(node.all_input_nodes) != 1:
            break
        if node.op == "call_module" and node.target in layers:
            return node, kinds
        kind = _kind(node, modules)
        if kind is None:
            break
        kinds.add(kind)
    return None, kinds


def _kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """"elementwise", "pool" (per channel), "flatten" (of dimensions 1 on), or None: not unit-wise."""
    flattens = node.args[1:] == (1,) and not node.kwargs  # flatten(x, 1)
    if node.op == "call_module":
        module = modules[node.target]
        if isinstance(module, nn.Flatten):
            return "flatten" if module.start_dim == 1 and module.end_dim == -1 else None
        return "elementwise" if isinstance(module, ELEMENTWISE_MODULES) else "pool" if isinstance(module, POOL_MODULES) else None
    if node.op == "call_function":
        if node.target is torch.flatten:
            return "flatten" if flattens else None
        return "elementwise" if node.target in ELEMENTWISE_FUNCTIONS else "pool" if node.target in POOL_FUNCTIONS else None
    if node.op == "call_method":
        if node.target == "flatten":
            return "flatten" if flattens else None
        return "elementwise" if node.target in ELEMENTWISE_METHODS else None
    return None


def _block(source: nn.Module, sink: nn.Module, kinds: set[str]) -> int:
    """How many consecutive inputs of the sink each unit of the source feeds; 0 where that is
    not certain. A convolution's channels reach a convolution one to one (pooling allowed) or a
    Linear layer in blocks of H x W features (flattened); a Linear layer's units reach a Linear
    layer one to one (nothing pools or flattens its features)."""
    if type(source) is nn.Linear:
        ok = type(sink) is nn.Linear and sink.in_features == source.out_features and kinds <= {"elementwise"}
        return 1 if ok else 0
    if type(source) is not nn.Conv2d:
        return 0
    units = source.out_channels
    if type(sink) is nn.Conv2d:
        return 1 if sink.groups == 1 and sink.in_channels == units and "flatten" not in kinds else 0
    if type(sink) is nn.Linear and "flatten" in kinds and sink.in_features % units == 0:
        return sink.in_features // units
    return 0
