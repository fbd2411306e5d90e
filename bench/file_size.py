"""File bytes of a compressed model in several layouts, at several compression ratios.

For each (model, target): the allocation jointcomp starts from (one projection of the
dense-trained weights; the layout, not the training, decides the bytes), stored as
* .jcz (ours),
* the fp32 state dict (torch.save),
* torch.save of the same pruned + quantized weights as dense fp32, then lzma,
* CSR: fp32 values + int32 column indices + int32 row pointers, other tensors fp32.

    python bench/file_size.py            # LeNet-5 / Fashion-MNIST and the digits MLP
"""
from __future__ import annotations

import io
import lzma

import torch

from common import dense_model, machine
from jointcomp import Compressor


def torch_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def csr_bytes(state: dict, compressed: set[str]) -> int:
    total = 0
    for name, t in state.items():
        if name in compressed:
            m = t.reshape(t.shape[0], -1)
            nnz = int((m != 0).sum())
            total += 4 * nnz + 4 * nnz + 4 * (m.shape[0] + 1)
        else:
            total += 4 * t.numel()
    return total


def rows(model_name: str, data_name: str, epochs: int, targets: list[str]) -> list[str]:
    model, data = dense_model(model_name, data_name, epochs)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    fp32 = len(torch_bytes(dense_state))
    out = []
    for target in targets:
        comp = Compressor(model, target, steps=1, meta={
            "model": model_name, "input_shape": list(data.input_shape), "num_classes": data.num_classes})
        jcz = comp.finish().file_bytes  # the joint projection of the dense weights, untrained
        state = dict(dense_state)
        state.update({n: v for n, v in zip(comp.names, comp.final.values)})
        lz = len(lzma.compress(torch_bytes(state), preset=9 | lzma.PRESET_EXTREME))
        csr = csr_bytes(state, set(comp.names))
        best_other = min(fp32, lz, csr)
        out.append(f"| {model_name} | {target} | {jcz:,} | {fp32:,} | {lz:,} | {csr:,} | "
                   f"{best_other / jcz:.2f}x | {'yes' if jcz < best_other else 'NO'} |")
    return out


def main() -> None:
    lines = [
        f"Machine: {machine()}",
        "",
        "| model | target (paper) | .jcz B | fp32 torch.save B | pruned+quantized torch.save + lzma B | CSR int32 B | next best / .jcz | .jcz smallest |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += rows("lenet5", "fashion-mnist", 2, ["50x", "100x", "300x", "600x", "1200x"])
    lines += rows("mlp", "digits", 20, ["20x", "50x", "100x"])
    print("\n".join(lines))


if __name__ == "__main__":
    main()
