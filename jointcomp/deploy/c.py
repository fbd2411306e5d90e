"""Portable C99 for a compressed network: `model.h` and `model.c`, `int jc_predict(const float *input, float *output)`.

Flash holds only const arrays: per compressed layer its codebook (float32), its codes
bit-packed at exactly b bits and the positions of its kept weights (a bitmap, or LEB128
gaps where that is smaller); biases, folded BatchNorm and layers left dense as float32.
The kernels (kernels.c) decode a layer's weights one kept weight at a time while they
multiply, so no layer is unpacked into RAM. RAM holds one arena of activations, laid out
by liveness (a value's space is reused once no later layer reads it). The const arrays
have external linkage (prefix jc_), so no compiler folds one away: the flash bytes reported
are exactly the read-only data the object file holds.

The model is traced with torch.fx: Linear, Conv2d (stride, padding, dilation, groups),
BatchNorm (folded into the convolution or linear layer before it, else applied alone),
MaxPool2d, AvgPool2d, AdaptiveAvgPool2d to 1x1, ReLU, Flatten/view/reshape, Dropout,
Identity and the residual add. Anything else is refused with the layer's name.

This module owns the byte costs of the C layout, as codec.py owns those of the .jcz.
"""
from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ..budget import LayerBounds, MeasuredAccounting, Shipped
from ..codec import PackedLayer, load_packed, pack_codes, plain_positions
from ..models import ShortcutA
from ..rundir import atomic_write

FLOAT_BYTES = 4
CODE_PAD_BYTES = 1  # the decoder reads codes two bytes at a time: one byte after the last
SUPPORTED = ("Linear, Conv2d, BatchNorm after them or alone, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d(1), ReLU, "
             "Flatten/view/reshape, Dropout, Identity, residual add, the CIFAR ResNets' option-A shortcut")

_ALIAS_MODULES = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_ALIAS_FUNCTIONS = (torch.flatten, torch.reshape)
_ALIAS_METHODS = ("view", "reshape", "flatten", "contiguous")
_RELU = (torch.relu, nn.functional.relu)
_ADD = (operator.add, torch.add)
_SHAPE_METHODS = ("size", "dim")  # ints, consumed only by views
_KERNEL_NEEDS = {  # kernels.c's sections each one calls; a model's source holds only what it uses
    "linear": ("weights", "next", "affine"), "conv": ("weights", "next", "affine"), "dense": ("weights",),
    "affine": (), "pool": (), "relu": (), "add": (), "copy": (), "argmax": (), "weights": (), "next": (),
    "shortcut": (),
}


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with the option-A shortcut kept whole (one C kernel, not a slice and a pad)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ShortcutA) or super().is_leaf_module(m, qualname)


def kernel_source(used: set[str]) -> str:
    """The sections of kernels.c that `used` kernels need, in the file's order."""
    text = resources.files("jointcomp.deploy").joinpath("kernels.c").read_text()
    parts = re.split(r"^/\* == (\w+) == \*/\n", text, flags=re.M)
    needed = set(used) | {dep for k in used for dep in _KERNEL_NEEDS[k]}
    return parts[0] + "".join(body for name, body in zip(parts[1::2], parts[2::2]) if name in needed)


# --- the byte costs of the C layout ------------------------------------------------------
def code_bytes(nnz: int, bits: int) -> int:
    return (nnz * bits + 7) // 8 + CODE_PAD_BYTES


def positions_c(mask: torch.Tensor) -> tuple[bool, bytes]:
    """(gaps?, bytes): the smaller of a bitmap and LEB128 gaps between kept weights (at
    least one byte: C has no empty arrays)."""
    bitmap, gaps = plain_positions(mask)
    gaps = gaps or b"\0"
    return (True, gaps) if len(gaps) < len(bitmap) else (False, bitmap)


def packed_bytes(layer: PackedLayer) -> int:
    """Flash bytes of one compressed weight: codebook, codes and positions."""
    nnz = int(layer.mask.sum())
    return FLOAT_BYTES * 2**layer.bits + code_bytes(nnz, layer.bits) + len(positions_c(layer.mask)[1])


def position_bits_estimate(density: torch.Tensor) -> torch.Tensor:
    """Expected position bits per kept weight at these densities: a bitmap (1/d), or LEB128
    gaps of geometric length (one byte, one more per 7 bits of gap), whichever is smaller."""
    d = density.double().clamp(1e-9, 1.0)
    extra = sum((1 - d) ** (128**k) for k in range(1, 5))  # P(gap >= 128^k)
    return torch.minimum(1 / d, 8 * (1 + extra))


# --- the model as a list of C operations -------------------------------------------------
@dataclass
class Op:
    """One C call: `kind` in linear, conv, affine, pool, relu, add, alias."""

    kind: str
    name: str  # the module path or function, for messages and comments
    inputs: list[str]  # fx value names
    output: str
    module: nn.Module | None = None
    weight: str | None = None  # state-dict name of a linear/conv weight
    scale: torch.Tensor | None = None  # per output channel, float64 (folded BatchNorm)
    shift: torch.Tensor | None = None  # per output channel, float64 (bias and BatchNorm)


def _bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    if bn.running_mean is None:
        raise ValueError(f"cannot export BatchNorm {bn} to C: it keeps no running statistics")
    scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def _module_op(node, module: nn.Module) -> Op:
    name, src = str(node.target), [node.args[0].name]
    if isinstance(module, nn.Linear):
        bias = module.bias.detach().double() if module.bias is not None else None
        return Op("linear", name, src, node.name, module, f"{name}.weight", shift=bias)
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":
            raise ValueError(f"cannot export layer {name!r} to C: padding_mode {module.padding_mode!r} (only zeros)")
        bias = module.bias.detach().double() if module.bias is not None else None
        return Op("conv", name, src, node.name, module, f"{name}.weight", shift=bias)
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale, shift = _bn_affine(module)
        return Op("affine", name, src, node.name, module, scale=scale, shift=shift)
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        if module.ceil_mode or getattr(module, "return_indices", False) or getattr(module, "dilation", 1) not in (1, (1, 1)) \
                or getattr(module, "divisor_override", None) is not None:
            raise ValueError(f"cannot export layer {name!r} to C: only plain pooling (no ceil_mode, dilation, "
                             "indices or divisor_override)")
        return Op("pool", name, src, node.name, module)
    if isinstance(module, nn.AdaptiveAvgPool2d):
        if module.output_size not in (1, (1, 1)):
            raise ValueError(f"cannot export layer {name!r} to C: AdaptiveAvgPool2d only to 1x1")
        return Op("pool", name, src, node.name, module)
    if isinstance(module, nn.ReLU):
        return Op("relu", name, src, node.name)
    if isinstance(module, ShortcutA):
        return Op("shortcut", name, src, node.name, module)
    if isinstance(module, _ALIAS_MODULES):
        return Op("alias", name, src, node.name)
    raise ValueError(f"cannot export layer {name!r} ({type(module).__name__}) to C; supported: {SUPPORTED}")


def _node_op(node, modules: dict[str, nn.Module]) -> Op | None:
    """The C operation of one fx node (None for the shape arithmetic of views)."""
    if node.op == "call_module":
        return _module_op(node, modules[node.target])
    what = getattr(node.target, "__name__", str(node.target))
    tensors = [a.name for a in node.args if isinstance(a, torch.fx.Node)]
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return None
    if (node.op == "call_function" and node.target in _ALIAS_FUNCTIONS) or \
            (node.op == "call_method" and node.target in _ALIAS_METHODS):
        return Op("alias", what, tensors[:1], node.name)
    if (node.op == "call_function" and node.target in _RELU) or (node.op == "call_method" and node.target == "relu"):
        return Op("relu", what, tensors[:1], node.name)
    if ((node.op == "call_function" and node.target in _ADD) or (node.op == "call_method" and node.target == "add")) \
            and len(tensors) == 2 and len(node.args) == 2 and not node.kwargs:
        return Op("add", "add", tensors, node.name)
    raise ValueError(f"cannot export operation {what!r} (in {node.name}) to C; supported: {SUPPORTED}")


class Program:
    """A model as C operations over named values, traced once with torch.fx; what it costs
    in flash for given packed weights, and its C source."""

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph = torch.fx.GraphModule(model, _Tracer().trace(model))
        except Exception as err:  # fx raises many kinds on data-dependent Python
            raise ValueError(f"cannot export the model to C: torch.fx cannot trace it "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        modules = dict(self.graph.named_modules())
        inputs = [n for n in self.graph.graph.nodes if n.op == "placeholder"]
        if len(inputs) != 1:
            raise ValueError(f"cannot export the model to C: its forward takes {len(inputs)} inputs, not one")
        self.input = inputs[0].name
        self.ops: list[Op] = []
        for node in self.graph.graph.nodes:
            if node.op == "output":
                if not isinstance(node.args[0], torch.fx.Node):
                    raise ValueError("cannot export the model to C: it must return one tensor")
                self.output = node.args[0].name
            elif node.op == "get_attr":
                raise ValueError(f"cannot export the model to C: it reads the tensor {node.target!r} directly")
            elif node.op != "placeholder" and (op := _node_op(node, modules)) is not None:
                self.ops.append(op)
        self._fold_batchnorm()

    def _fold_batchnorm(self) -> None:
        """A BatchNorm whose input only feeds it, from a linear or convolution, becomes that
        layer's per-channel epilogue: y = acc * scale + (bias * scale + shift)."""
        producers = {op.output: op for op in self.ops}
        readers: dict[str, int] = {}
        for op in self.ops:
            for v in op.inputs:
                readers[v] = readers.get(v, 0) + 1
        kept = []
        for op in self.ops:
            layer = producers.get(op.inputs[0]) if op.kind == "affine" else None
            if layer is None or layer.kind not in ("linear", "conv") or layer.scale is not None \
                    or readers[op.inputs[0]] != 1 or op.inputs[0] == self.output:
                kept.append(op)
                continue
            bias = layer.shift if layer.shift is not None else torch.zeros_like(op.shift)
            layer.scale, layer.shift = op.scale, bias * op.scale + op.shift
            for later in self.ops:  # what read the BatchNorm now reads the layer
                later.inputs = [layer.output if v == op.output else v for v in later.inputs]
            if self.output == op.output:
                self.output = layer.output
        self.ops = kept

    @property
    def weights(self) -> dict[str, Op]:
        """The linear and convolution weights, by state-dict name."""
        return {op.weight: op for op in self.ops if op.weight is not None}

    def dense_bytes(self, packed_names) -> int:
        """Flash bytes of everything but the packed weights: biases, folded BatchNorm, and the
        linear/convolution weights not in `packed_names`, as float32."""
        total = sum(FLOAT_BYTES * t.numel() for op in self.ops for t in (op.scale, op.shift) if t is not None)
        return total + sum(FLOAT_BYTES * op.module.weight.numel() for name, op in self.weights.items()
                           if name not in packed_names)

    def flash_bytes(self, packed: dict[str, PackedLayer]) -> int:
        """The const data of the C export with these packed weights, in bytes."""
        unknown = set(packed) - set(self.weights)
        if unknown:
            raise ValueError(f"cannot export to C: {sorted(unknown)[0]} is compressed but is no Linear/Conv2d weight")
        return self.dense_bytes(packed) + sum(packed_bytes(layer) for layer in packed.values())

    def render(self, packed: dict[str, PackedLayer], input_shape: tuple[int, ...]) -> "CExport":
        return _Renderer(self, packed, tuple(input_shape)).render()


# --- C source ----------------------------------------------------------------------------
@dataclass
class CExport:
    """The generated sources and what they cost on the device."""

    source: str  # model.c
    header: str  # model.h
    flash_bytes: int  # const data: every weight, bias and codebook array
    ram_bytes: int  # the activation arena
    input_size: int
    output_size: int


def _floats(values: torch.Tensor) -> str:
    """Exact C99 float literals (hexadecimal: no rounding on the way)."""
    return ", ".join(float(v).hex() + "f" for v in values.float().flatten().tolist())


def _bytes(data: bytes) -> str:
    return ", ".join(f"0x{b:02x}" for b in data)


@dataclass
class _Buffer:
    size: int  # floats
    first: int  # op index that writes it
    last: int  # last op index that reads it
    offset: int = 0


@dataclass
class _Renderer:
    program: Program
    packed: dict[str, PackedLayer]
    input_shape: tuple[int, ...]
    arrays: list[str] = field(default_factory=list)
    flash: int = 0
    weight_args: dict[str, str] = field(default_factory=dict)  # a weight used twice is stored once
    kernels: set[str] = field(default_factory=lambda: {"copy", "argmax"})

    def render(self) -> CExport:
        from torch.fx.passes.shape_prop import ShapeProp

        p = self.program
        try:
            ShapeProp(p.graph).propagate(torch.zeros(1, *self.input_shape))
        except Exception as err:
            raise ValueError(f"the model does not run on inputs of shape {list(self.input_shape)} "
                             f"({type(err).__name__}: {str(err).splitlines()[0]})") from None
        shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in p.graph.graph.nodes
                  if isinstance(n.meta.get("tensor_meta"), torch.fx.passes.shape_prop.TensorMetadata)}
        buffers, where = self._plan(shapes)
        calls = [self._call(i, op, shapes, where) for i, op in enumerate(p.ops)]
        out_size = math.prod(shapes[p.output])
        ram = FLOAT_BYTES * max((b.offset + b.size for b in buffers), default=0)
        in_size = math.prod(self.input_shape)
        source = "\n".join([
            "/* Generated by jointcomp: a compressed network as dependency-free C99. */",
            '#include "model.h"',
            kernel_source(self.kernels),
            *self.arrays,
            "",
            f"static float jc_arena[{max(ram // FLOAT_BYTES, 1)}]; /* activations, reused by liveness */",
            "",
            "int jc_predict(const float *input, float *output)",
            "{",
            *calls,
            f"    jc_copy({where[p.output]}, output, {out_size});",
            f"    return jc_argmax(output, {out_size});",
            "}",
            "",
        ])
        header = "\n".join([
            "/* Generated by jointcomp. */",
            "#ifndef JC_MODEL_H",
            "#define JC_MODEL_H",
            f"#define JC_INPUT_SIZE {in_size} /* floats: one input of shape {'x'.join(map(str, self.input_shape))}, "
            "row-major */",
            f"#define JC_OUTPUT_SIZE {out_size}",
            f"#define JC_FLASH_BYTES {self.flash} /* const data: weights, codebooks, biases */",
            f"#define JC_RAM_BYTES {ram} /* the activation arena */",
            "/* Writes the outputs (logits) and returns the index of the largest. */",
            "int jc_predict(const float *input, float *output);",
            "#endif",
            "",
        ])
        expected = p.flash_bytes(self.packed)
        assert self.flash == expected, (self.flash, expected)  # the accounting and the source agree
        return CExport(source, header, self.flash, ram, in_size, out_size)

    def _plan(self, shapes: dict[str, tuple[int, ...]]) -> tuple[list[_Buffer], dict[str, str]]:
        """Give every value a place: the input pointer, or an offset in the arena. Views share
        their input's place; relu, BatchNorm and add write over an input no one reads later."""
        p = self.program
        last_read = {p.output: len(p.ops)}
        for i, op in enumerate(p.ops):
            for v in op.inputs:
                last_read[v] = max(last_read.get(v, -1), i)
        buffer_of: dict[str, _Buffer | None] = {p.input: None}  # None: the caller's input
        buffers: list[_Buffer] = []
        for i, op in enumerate(p.ops):
            source = buffer_of[op.inputs[0]]
            if op.kind == "alias":
                buffer_of[op.output] = source
            elif op.kind in ("relu", "affine", "add") and source is not None and source.last <= i:
                buffer_of[op.output] = source
            else:
                buffer_of[op.output] = _Buffer(math.prod(shapes[op.output]), i, i)
                buffers.append(buffer_of[op.output])
            for v in (op.output, *op.inputs):
                if buffer_of[v] is not None:
                    buffer_of[v].last = max(buffer_of[v].last, last_read.get(v, i))
        placed: list[_Buffer] = []
        for b in sorted(buffers, key=lambda b: -b.size):  # greedy first fit, largest first
            offset = 0
            for o in sorted((o for o in placed if o.first <= b.last and b.first <= o.last), key=lambda o: o.offset):
                if offset + b.size <= o.offset:
                    break
                offset = max(offset, o.offset + o.size)
            b.offset = offset
            placed.append(b)
        where = {v: "input" if b is None else f"jc_arena + {b.offset}" for v, b in buffer_of.items()}
        return buffers, where

    def _array(self, ctype: str, name: str, count: int, body: str, nbytes: int) -> str:
        self.arrays.append(f"const {ctype} {name}[{count}] = {{{body}}};")
        self.flash += nbytes
        return name

    def _floats_array(self, name: str, values: torch.Tensor | None) -> str:
        if values is None:
            return "NULL"
        return self._array("float", name, values.numel(), _floats(values), FLOAT_BYTES * values.numel())

    def _weights(self, op: Op, c: str) -> str:
        if op.weight not in self.weight_args:
            self.weight_args[op.weight] = self._store_weights(op, c)
        return self.weight_args[op.weight]

    def _store_weights(self, op: Op, c: str) -> str:
        layer = self.packed.get(op.weight)
        if layer is None:
            self.kernels.add("dense")
            w = op.module.weight.detach()
            return f"jc_dense({self._floats_array(c + '_weight', w)}, {w.numel()})"
        nnz = int(layer.mask.sum())
        gaps, positions = positions_c(layer.mask)
        codes = pack_codes(layer.codes, layer.bits) + bytes(CODE_PAD_BYTES)
        book = self._floats_array(c + "_codebook", layer.codebook)
        codes_name = self._array("uint8_t", c + "_codes", len(codes), _bytes(codes), len(codes))
        pos_name = self._array("uint8_t", c + "_positions", len(positions), _bytes(positions), len(positions))
        return f"jc_packed({book}, {codes_name}, {pos_name}, {layer.mask.numel()}, {nnz}, {layer.bits}, {int(gaps)})"

    def _call(self, i: int, op: Op, shapes: dict[str, tuple[int, ...]], where: dict[str, str]) -> str:
        c = f"jc_{i}_{''.join(ch if ch.isalnum() else '_' for ch in op.name)}"
        if op.kind != "alias":
            self.kernels.add(op.kind)
        x, y = where[op.inputs[0]], where[op.output]
        comment = f"    /* {op.name}: {op.kind} -> {list(shapes[op.output][1:])} */\n"
        size_in, size_out = math.prod(shapes[op.inputs[0]]), math.prod(shapes[op.output])
        if op.kind == "alias":
            return comment.rstrip("\n")
        if op.kind == "relu":
            return comment + f"    jc_relu({x}, {y}, {size_out});"
        if op.kind == "add":
            return comment + f"    jc_add({x}, {where[op.inputs[1]]}, {y}, {size_out});"
        if op.kind == "shortcut":
            (_, cin, ih, iw), (_, cout, oh, ow) = _chw(op, shapes[op.inputs[0]]), _chw(op, shapes[op.output])
            return comment + f"    jc_shortcut({x}, {y}, {cin}, {ih}, {iw}, {op.module.pad}, {cout}, {oh}, {ow});"
        scale = self._floats_array(c + "_scale", op.scale)
        shift = self._floats_array(c + "_shift", op.shift)
        if op.kind == "affine":
            channels = shapes[op.inputs[0]][1]
            return comment + f"    jc_affine({x}, {y}, {channels}, {size_in // channels}, {scale}, {shift});"
        if op.kind == "linear":
            m = op.module
            return comment + (f"    jc_linear({self._weights(op, c)}, {x}, {y}, {size_in // m.in_features}, "
                              f"{m.in_features}, {m.out_features}, {scale}, {shift});")
        (_, cin, ih, iw), (_, cout, oh, ow) = _chw(op, shapes[op.inputs[0]]), _chw(op, shapes[op.output])
        m = op.module
        if op.kind == "conv":
            kh, kw = m.kernel_size
            dh, dw = m.dilation
            sh, sw = m.stride
            if isinstance(m.padding, str):  # "valid" or "same": PyTorch pads the extra row/column at the end
                ph, pw = (0, 0) if m.padding == "valid" else (dh * (kh - 1) // 2, dw * (kw - 1) // 2)
            else:
                ph, pw = m.padding
            return comment + (f"    jc_conv2d({self._weights(op, c)}, {x}, {y}, {cin}, {ih}, {iw}, {cout}, {oh}, "
                              f"{ow}, {kh}, {kw}, {sh}, {sw}, {ph}, {pw}, {dh}, {dw}, {m.groups}, {scale}, {shift});")
        if isinstance(m, nn.AdaptiveAvgPool2d):
            k, s, pad, is_max, count_pad = (ih, iw), (1, 1), (0, 0), 0, 1
        else:
            pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
            k, s, pad = pair(m.kernel_size), pair(m.stride or m.kernel_size), pair(m.padding)
            is_max, count_pad = int(isinstance(m, nn.MaxPool2d)), int(getattr(m, "count_include_pad", True))
        return comment + (f"    jc_pool2d({x}, {y}, {cin}, {ih}, {iw}, {oh}, {ow}, {k[0]}, {k[1]}, {s[0]}, {s[1]}, "
                          f"{pad[0]}, {pad[1]}, {is_max}, {count_pad});")


def _chw(op: Op, shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) != 4:
        raise ValueError(f"cannot export layer {op.name!r} to C: it needs 4-D input, got shape {list(shape)}")
    return shape


# --- the budget mode ---------------------------------------------------------------------
class FlashAccounting(MeasuredAccounting):
    """The budget mode in which the target is the C export's const data (flash): biases,
    folded BatchNorm and layers left dense are reserved; each kept weight pays its code and
    its position, each layer its codebook and a few bytes."""

    description = "const data (flash) of the C export, export-c"
    LAYER_OVERHEAD_BITS = 8 * (CODE_PAD_BYTES + 1)  # the pad byte, and the positions' last partial byte
    MARGIN = 1.02

    def __init__(self, input_shape: tuple[int, ...] | None = None) -> None:
        super().__init__(input_shape)
        self.reserved_bytes = 0

    def reference_bits(self, model: nn.Module, layers: list[tuple[str, nn.Parameter, LayerBounds]]) -> tuple[float, float]:
        program = Program(model)
        compressed = [n for n, _, b in layers if not b.dense]
        stray = [n for n in compressed if n not in program.weights]
        if stray:
            raise ValueError(f"the flash budget mode compresses only Linear/Conv2d weights the C export uses; "
                             f"{stray[0]} is not one (leave it out with exclude)")
        self.reserved_bytes = program.dense_bytes(compressed)
        return 8.0 * self.reserved_bytes, 8.0 * program.dense_bytes(())

    def position_cost(self, density: torch.Tensor) -> torch.Tensor:
        return position_bits_estimate(density) * self.MARGIN

    def layer_bits(self, bits: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
        return 8.0 * FLOAT_BYTES * 2.0 ** bits.double() + self.LAYER_OVERHEAD_BITS

    def measure(self, size_bits: float, shipped: Shipped) -> float:
        return 8.0 * (self.reserved_bytes + sum(packed_bytes(layer) for layer in shipped.packed().values()))


# --- from a .jcz file ----------------------------------------------------------------------
def export_c(path: str | Path, out_dir: str | Path, *, model: nn.Module | None = None,
             input_shape: tuple[int, ...] | None = None, allow_import: bool = False) -> CExport:
    """Write `model.h` and `model.c` for the network in the .jcz file `path` into `out_dir`
    (atomically); returns the sources with their flash and RAM bytes. `input_shape` (one
    example, without the batch) defaults to the file's; `model` as for `load_compressed`."""
    program, packed, shape = _program_of(path, model, input_shape, allow_import)
    export = program.render(packed, shape)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "model.h", export.header.encode())
    atomic_write(out / "model.c", export.source.encode())
    return export


def flash_report(path: str | Path, *, model: nn.Module | None = None, input_shape: tuple[int, ...] | None = None,
                 allow_import: bool = False) -> CExport:
    """What `export_c` would write for this file, without writing it."""
    program, packed, shape = _program_of(path, model, input_shape, allow_import)
    return program.render(packed, shape)


def _program_of(path, model, input_shape, allow_import):
    model, packed, spec = load_packed(path, model, allow_import)
    shape = input_shape or (spec or {}).get("input_shape")
    if not shape:
        raise ValueError(f"{path} does not say its input shape; pass it (e.g. --input-shape 1,28,28)")
    program = Program(model)
    program.flash_bytes(packed)  # checks every packed weight belongs to an exported layer
    return program, packed, tuple(shape)
