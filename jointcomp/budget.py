"""Size accounting and target parsing.

A target is given once, as a ratio ("500x", against fp32 of the compressible weights), a
size ("96000b" bits, "12KB", "12KiB", "1.5MB") or a fraction ("0.2%"). A bare number
means a ratio. Targets are resolved to bits against an accounting, which says what one
kept weight and one layer cost: `Accounting` counts bits x non-zeros only, as the paper
does. Each accounting is a budget mode, defined next to the format it prices ("file" in the codec,
"flash" in the C export) and listed by name in budget_modes.py.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

DENSE_BITS = 32
BIT_CHOICES = range(1, 9)

SIZE_UNITS = {  # in bits
    "b": 1, "bit": 1, "bits": 1,
    "B": 8, "byte": 8, "bytes": 8,
    "KB": 8_000, "kB": 8_000, "KiB": 8 * 1024,
    "MB": 8_000_000, "MiB": 8 * 1024 * 1024,
}
_TARGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z%]*)\s*$")


@dataclass(frozen=True)
class LayerBounds:
    """Per-layer limits honoured by both projections.

    `dense=True` leaves the layer uncompressed (fp32, every weight kept); it still
    counts against the budget at 32 bits per weight.
    """

    min_bits: int = 1
    max_bits: int = 8
    min_density: float = 0.0
    dense: bool = False

    def __post_init__(self) -> None:
        lo, hi = BIT_CHOICES.start, BIT_CHOICES.stop - 1
        if not lo <= self.min_bits <= self.max_bits <= hi:
            raise ValueError(
                f"layer bounds need {lo} <= min_bits <= max_bits <= {hi}, "
                f"got min_bits={self.min_bits}, max_bits={self.max_bits}"
            )
        if not 0.0 <= self.min_density <= 1.0:
            raise ValueError(f"min_density must lie in [0, 1], got {self.min_density}")

    def min_keep(self, numel: int) -> int:
        """Fewest weights this layer may keep (at least one, so the layer still exists)."""
        return max(1, math.ceil(self.min_density * numel))


@dataclass(frozen=True)
class Budget:
    """What a projection must fit: `bits` in the accounting in force, and the kept fraction per
    compressed layer that the accountings of real files price positions at (`density`; None:
    every weight kept). The Compressor passes the densities of its last projection, so an
    accounting holds no state that a projection changes."""

    bits: float
    density: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "bits", float(self.bits))


@dataclass(frozen=True)
class Shipped:
    """An allocation in the forms it ships in, each built only when an accounting asks:
    its packed layers (name -> codec.PackedLayer) and the bytes of its .jcz file."""

    packed: Callable[[], dict[str, Any]]
    file_bytes: Callable[[], int]


class Accounting:
    """The paper's size: sum over compressed layers of bitwidth x non-zeros (layers left
    dense count at 32 bits per weight). The checkpoint codec's `FileAccounting` prices
    the exported file's bytes through this same interface, bops.py the bit-operations.
    `input_shape` (one input's) is for the accountings that run the model."""

    description = "bits x non-zeros of the weights (the paper's count)"
    units = SIZE_UNITS  # what an absolute target may be given in
    unit = "b"  # the one an exact amount of this accounting is written in

    def __init__(self, input_shape: tuple[int, ...] | None = None) -> None:
        self.input_shape = input_shape

    @staticmethod
    def format(value: float) -> str:
        """A value of this accounting for people."""
        return format_bits(value)

    def reference_bits(self, model: nn.Module, layers: list[tuple[str, nn.Parameter, LayerBounds]]) -> tuple[float, float]:
        """(reserved, dense): the bits no compression removes (layers left dense), and the
        fp32 size that ratios are taken against (every layer found)."""
        reserved = DENSE_BITS * sum(w.numel() for _, w, b in layers if b.dense)
        return float(reserved), float(DENSE_BITS * sum(w.numel() for _, w, _ in layers))

    def weight_bits(self, bits: torch.Tensor, numel: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
        """Cost in bits of one kept weight of each layer at bitwidth `bits`, when the layers
        keep the fractions `density` (which the paper's count ignores)."""
        return bits.double()

    def layer_bits(self, bits: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
        """Fixed cost in bits of each layer at bitwidth `bits` (codebook, headers)."""
        return torch.zeros_like(bits, dtype=torch.float64)

    def size_bits(self, bits: torch.Tensor, nnz: torch.Tensor, numel: torch.Tensor,
                  density: torch.Tensor | None = None) -> float:
        """Total cost of layers with these bitwidths and non-zero counts (positions priced at `density`)."""
        per_layer = self.weight_bits(bits, numel, density) * nnz.double() + self.layer_bits(bits, numel)
        return float(per_layer.sum())

    def measure(self, size_bits: float, shipped: Shipped) -> float:
        """The size of a finished allocation in this accounting: its own sum here, the real
        bits of what ships (`shipped`) in the accountings of real files."""
        return size_bits


class MeasuredAccounting(Accounting):
    """The accountings of a real artefact (the .jcz file, the C export's flash): each kept
    weight pays its code and its position, the position estimated per layer from the density
    the projection is given (`position_cost`); `measure` is the artefact's real size, and the
    Compressor trims until that fits."""

    def position_cost(self, density: torch.Tensor) -> torch.Tensor:
        """Estimated position bits per kept weight of layers at these densities."""
        raise NotImplementedError

    def weight_bits(self, bits: torch.Tensor, numel: torch.Tensor, density: torch.Tensor | None = None) -> torch.Tensor:
        kept = torch.ones(numel.shape[0], dtype=torch.float64) if density is None else density.double().cpu()
        pos = self.position_cost(kept).to(bits.device)
        return bits.double() + (pos if bits.dim() == 1 else pos[:, None])


def parse_target(spec: str | float | int, dense_bits: float, units: dict[str, int] = SIZE_UNITS) -> float:
    """Resolve a target to bits; `dense_bits` is fp32 x numel of the compressible weights. An absolute
    target is in one of `units` (another accounting's, e.g. bit-operations: matched in any case)."""
    if isinstance(spec, bool):
        raise ValueError(f"target {spec!r} is not a size; use e.g. '50x', '12KB' or '0.2%'")
    if isinstance(spec, (int, float)):
        number, unit = float(spec), "x"
    else:
        match = _TARGET_RE.match(str(spec))
        if not match:
            raise ValueError(f"cannot read target {spec!r}; use a ratio ('50x'), an amount in {_names(units)} "
                             "or a fraction of the dense model ('0.2%')")
        number, unit = float(match.group(1)), match.group(2) or "x"
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"target {spec!r} must be a positive number")
    if unit in ("x", "X"):
        return dense_bits / number
    if unit == "%":
        return dense_bits * number / 100.0
    factor = units.get(unit, units.get(unit.lower()))  # exact first: b is a bit, B a byte
    if factor is None:
        raise ValueError(f"unknown unit {unit!r} in target {spec!r}; use x, % or {_names(units)}")
    return number * factor


def _names(units: dict[str, int]) -> str:
    return ", ".join(units)


def feasible_range(
    numel: list[int], bounds: list[LayerBounds], accounting: Accounting, reserved_bits: float = 0.0,
    dense_bits: float | None = None,
) -> tuple[float, float]:
    """Smallest and largest size (bits) a target may ask for with these layers, plus a
    fixed part that no compression removes (`reserved_bits`): the smallest keeps each layer's
    fewest weights at its fewest bits, the largest is the dense model (`dense_bits`, in the
    accounting's terms; default: the fp32 weights)."""
    n = torch.tensor(numel, dtype=torch.float64)
    dense = torch.tensor([b.dense for b in bounds])
    min_bits = torch.tensor([b.min_bits for b in bounds])
    keep = torch.tensor([b.min_keep(k) for b, k in zip(bounds, numel)], dtype=torch.float64)
    smallest = accounting.weight_bits(min_bits, n, keep / n) * keep + accounting.layer_bits(min_bits, n)
    smallest = torch.where(dense, DENSE_BITS * n, smallest)
    largest = dense_bits if dense_bits is not None else float(DENSE_BITS * n.sum()) + reserved_bits
    return float(smallest.sum()) + reserved_bits, largest


def resolve_target(
    spec: str | float | int,
    numel: list[int],
    bounds: list[LayerBounds],
    accounting: Accounting,
    reserved_bits: float = 0.0,
    reference_bits: float | None = None,
) -> float:
    """Parse `spec` and check it can be met; raise ValueError naming the feasible range.

    Ratios and fractions are taken against `reference_bits` (default: fp32 of the weights)."""
    dense_bits = reference_bits if reference_bits is not None else DENSE_BITS * sum(numel)
    bits = parse_target(spec, dense_bits, accounting.units)
    low, high = feasible_range(numel, bounds, accounting, reserved_bits, reference_bits)
    if not low <= bits <= high:
        show = accounting.format
        raise ValueError(
            f"target {spec!r} = {show(bits)} is outside what this model can reach: "
            f"between {show(low)} ({dense_bits / low:.0f}x) and "
            f"{show(high)} ({dense_bits / high:.2g}x, the dense model)"
        )
    return bits


def format_bits(bits: float) -> str:
    """Human-readable size, in bytes with a decimal prefix (in bits below one byte)."""
    if bits < 8:
        return f"{bits:.3g} bits"
    size, unit = bits / 8, "B"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            break
        size /= 1000
    return f"{size:.4g} B" if unit == "B" else f"{size:.2f} {unit}"
