"""ONNX for standard runtimes (onnxruntime, TensorRT, OpenVINO, ...).

ONNX has no packed sparse weights: every weight is stored densely as float32, so the
.onnx file is about as large as the dense model. It is for running the compressed
network's exact weights elsewhere, not for the size; the .jcz and the C export are.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from ..codec import load_packed
from ..rundir import atomic_write


def export_onnx(path: str | Path, out: str | Path, *, model: nn.Module | None = None,
                input_shape: tuple[int, ...] | None = None, allow_import: bool = False) -> int:
    """Write the network in the .jcz file `path` as one .onnx file `out` (input "input" with
    a dynamic batch, output "output"), atomically; returns its bytes."""
    model, _, spec = load_packed(path, model, allow_import)
    shape = input_shape or (spec or {}).get("input_shape")
    if not shape:
        raise ValueError(f"{path} does not say its input shape; pass it (e.g. --input-shape 1,28,28)")
    example = torch.zeros(2, *shape)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), buffer, input_names=["input"], output_names=["output"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, dynamo=True)
    except Exception as err:  # the exporter raises many kinds for unsupported operations
        raise ValueError(f"cannot export the model to ONNX ({type(err).__name__}: "
                         f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    data = buffer.getvalue()
    atomic_write(out, data)
    return len(data)
