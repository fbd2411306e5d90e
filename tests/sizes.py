"""Sizes counted from what a run wrote, not from the records it reported: the paper's
bits x kept weights read back from a .jcz file, and the fp32 size targets are ratios of."""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from jointcomp.budget import parse_target
from jointcomp.codec import load_packed


def fp32_bits(model: nn.Module) -> int:
    """32 bits per weight of every Conv2d and Linear layer (what a ratio target divides)."""
    return 32 * sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def paper_bits_in_file(path: str | Path, model: nn.Module | None = None) -> int:
    """The paper's size of a .jcz, read back from the file: bits x kept weights of every
    compressed layer (`model`: an instance to load into, for files without a model name)."""
    _, packed, _ = load_packed(path, copy.deepcopy(model) if model is not None else None)
    return sum(layer.bits * int(layer.mask.sum()) for layer in packed.values())


def fits(path: str | Path, target: str, model: nn.Module) -> bool:
    """Whether the file's paper size fits `target` ("50x"), a ratio of `model`'s fp32 size."""
    return paper_bits_in_file(path, model) <= parse_target(target, fp32_bits(model))
