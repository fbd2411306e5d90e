"""jointcomp against real peers at equal bytes: Sony's Model Compression Toolkit (mixed-precision
post-training quantization to a weights-memory target) and torchao (weight-only int8 / intx),
from the same dense LeNet-5 / Fashion-MNIST start as bench/quality.py.

    make bench-peers        # its own virtualenv, .venv-peers; the product never needs these packages

Each peer is run at the sizes it can reach and measured twice: its nominal size (MCT: its own
weights-memory count; torchao: its codes packed at their bits, plus float scales and the
layers it leaves alone) and the bytes of the file its own export writes. jointcomp then runs in
the file budget mode (the .jcz must fit) at each peer's bytes, with 1 and with --epochs epochs
(`python -m jointcomp compress` with the CLI's defaults otherwise); then at targets no peer
reaches. Every result is a row of bench/results/peers.jsonl (a peer's budget mode: "its own").
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from common import CACHE, commit, dense_model, dense_weights, jointcomp, machine, paper_bits, store_rows
from jointcomp import EngineConfig
from jointcomp.codec import fp32_bytes
from jointcomp.rundir import SUMMARY_FILE

CALIBRATION_IMAGES = 640  # MCT's representative data: 10 batches of 64 training images, no labels
RUNS = CACHE / "peers"


@dataclass
class Peer:
    """One peer tool's result: its accuracy, its nominal size and its exported file's bytes."""

    tool: str
    setting: str
    target: str  # the setting, short: what the tool was asked for, in its own terms
    used: str  # training data it saw
    accuracy: float | None
    nominal: int | None
    file_bytes: int | None
    export: str
    seconds: float


def accuracy(model, data) -> float:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x) for x in data.val_x.split(1000)]).argmax(1)
    return (predictions == data.val_y).float().mean().item()


def torch_save_bytes(model) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(buffer.getvalue())


def torchao_rows(dense, data):
    """Weight-only quantization of the Linear layers (torchao's quantize_ skips convolutions)."""
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, quantize_
    from torchao.quantization.granularity import PerGroup

    linear = sum(m.weight.numel() for m in dense.modules() if isinstance(m, torch.nn.Linear))
    rest = sum(t.numel() for t in dense.state_dict().values()) - linear
    configs = [("int8 weight-only", Int8WeightOnlyConfig(), 8, None)]
    configs += [(f"int{b} weight-only, groups of 100", IntxWeightOnlyConfig(weight_dtype=getattr(torch, f"int{b}"),
                                                                           granularity=PerGroup(100)), b, 100)
                for b in (4, 2)]
    for name, config, bits, group in configs:
        tic = time.perf_counter()
        model = copy.deepcopy(dense)
        quantize_(model, config)
        scales = linear // group if group else sum(m.out_features for m in dense.modules() if isinstance(m, torch.nn.Linear))
        nominal = (bits * linear) // 8 + 4 * (rest + scales)  # its codes packed, float scales and the rest
        yield Peer("torchao", name, f"int{bits}", "none", accuracy(model, data), nominal, torch_save_bytes(model),
                   "torch.save", time.perf_counter() - tic)


@contextlib.contextmanager
def quiet_stdout():
    """MCT's ILP solver (CBC) prints to file descriptor 1 from its own process: silence it."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def mct_rows(dense, data, ratios):
    """Mixed-precision PTQ (weights 2/4/8 bits per layer, activations 8 bits) to a weights-memory
    target of fp32 / ratio; exported with MCT's own exporter (TorchScript, fake-quantized)."""
    import model_compression_toolkit as mct

    def calibration():
        for x in data.train_x[:CALIBRATION_IMAGES].split(64):
            yield [x]

    for ratio in ratios:
        tic = time.perf_counter()
        config = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=64))
        target = mct.core.ResourceUtilization(weights_memory=fp32_bytes(dense) / ratio)
        try:
            with quiet_stdout():
                model, info = mct.ptq.pytorch_post_training_quantization(copy.deepcopy(dense), calibration,
                                                                         target_resource_utilization=target,
                                                                         core_config=config)
        except Exception:  # MCT raises when no bit assignment fits the target
            yield Peer("MCT", f"mixed precision, weights memory fp32/{ratio:g}", f"fp32/{ratio:g}", "-", None, None, None,
                       "cannot: no bit assignment fits (2 bits is its smallest)", 0.0)
            continue
        bits = [q.num_bits for m in model.modules() for q in (getattr(m, "weights_quantizers", None) or {}).values()]
        with tempfile.TemporaryDirectory() as tmp, quiet_stdout():
            path = os.path.join(tmp, "model.pt")
            mct.exporter.pytorch_export_model(model, save_model_path=path, repr_dataset=calibration,
                                              serialization_format=mct.exporter.PytorchExportSerializationFormat.TORCHSCRIPT,
                                              quantization_format=mct.exporter.QuantizationFormat.FAKELY_QUANT)
            file_bytes = os.path.getsize(path)
        nominal = int(info.final_resource_utilization.weights_memory)
        yield Peer("MCT", f"mixed precision, weights memory fp32/{ratio:g} (bits {'/'.join(map(str, bits))})",
                   f"fp32/{ratio:g}", f"{CALIBRATION_IMAGES} images", accuracy(model, data), nominal, file_bytes,
                   "TorchScript (fake-quant)", time.perf_counter() - tic)


def jointcomp_row(weights: Path, target: str, epochs: int, seed: int, budget_mode: str = "file") -> dict:
    """`python -m jointcomp compress` from the dense start at `target` with the CLI's defaults and
    `epochs`, as a row."""
    out = RUNS / f"lenet5-{budget_mode}-{target}-{epochs}ep-seed{seed}"
    cmd = ["compress", "--model", "lenet5", "--data", "fashion-mnist", "--pretrained", str(weights), "--target", target,
           *(["--budget-mode", budget_mode] if budget_mode != "paper" else []), "--epochs", str(epochs),
           "--seed", str(seed), "--out", str(out), "--overwrite"]
    seconds = jointcomp(cmd)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {"network": "lenet5", "data": "fashion-mnist", "method": "admm", "start": EngineConfig.start, "target": target,
            "budget_mode": budget_mode, "seed": seed, "accuracy": summary["accuracy"],
            "dense_accuracy": summary["dense_accuracy"], "paper_bits": paper_bits(summary),
            "file_bytes": summary["file_bytes"], "bops": summary["bops"], "bops_ratio": summary["bops_ratio"],
            "epochs": epochs, "minutes": seconds / 60,
            "command": "python -m jointcomp " + shlex.join(cmd[:-3]).replace(str(CACHE) + "/", ""),
            "commit": commit(), "machine": machine()}


def peer_row(peer: Peer, dense_accuracy: float, seed: int) -> dict:
    """A peer's result as a row: its tool is the method, its own setting the target (in its own terms)."""
    return {"network": "lenet5", "data": "fashion-mnist", "method": peer.tool, "target": peer.target,
            "budget_mode": "its own", "seed": seed, "accuracy": peer.accuracy, "dense_accuracy": dense_accuracy,
            "file_bytes": peer.file_bytes, "nominal_bytes": peer.nominal, "setting": peer.setting, "export": peer.export,
            "epochs": 0, "minutes": peer.seconds / 60, "command": f"cd bench && python peers.py --seed {seed}",
            "commit": commit(), "machine": machine()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, nargs="+", default=[1, 15], help="jointcomp's training epochs")
    p.add_argument("--mct-ratios", type=float, nargs="+", default=[4, 8, 16, 17],
                   help="MCT weights-memory targets, as fp32 bytes / ratio (2 bits everywhere is about 16)")
    p.add_argument("--beyond", nargs="*", default=["100x", "600x"], help="paper targets no peer reaches")
    p.add_argument("--smallest-only", action="store_true",
                   help="run jointcomp only at the smallest size a peer reached (for long runs)")
    args = p.parse_args()
    dense, data = dense_model("lenet5", "fashion-mnist", 15, args.seed)
    weights, fp32, dense_accuracy = dense_weights("lenet5", "fashion-mnist", 15, args.seed), fp32_bytes(dense), accuracy(dense, data)
    print(f"Machine: {machine()}; model-compression-toolkit {version('model-compression-toolkit')}, torchao "
          f"{version('torchao')}; LeNet-5 / Fashion-MNIST dense start (15 epochs, seed {args.seed}): accuracy "
          f"{dense_accuracy:.4f}, fp32 state dict {fp32:,} B, torch.save {torch_save_bytes(dense):,} B. "
          f"jointcomp trains on the 60,000 training images for the epochs shown.\n")
    print("| tool | setting | training data | accuracy | nominal size B | bytes of its exported file | export |")
    print("|---|---|---|---|---|---|---|")
    rows, points = [], []
    for peer in [*torchao_rows(dense, data), *mct_rows(dense, data, args.mct_ratios)]:
        cells = [f"{peer.accuracy:.4f}" if peer.accuracy is not None else "-", f"{peer.nominal:,}" if peer.nominal else "-",
                 f"{peer.file_bytes:,}" if peer.file_bytes else "-"]
        print(f"| {peer.tool} | {peer.setting} | {peer.used} | {' | '.join(cells)} | {peer.export} |", flush=True)
        if peer.nominal:
            rows.append(peer_row(peer, dense_accuracy, args.seed))
            points.append((f"{peer.tool} {peer.setting}", peer.nominal, peer.file_bytes))
    if args.smallest_only:
        points = [min(points, key=lambda point: point[1])]
    print("\n| jointcomp at the bytes of | .jcz target B | epochs | accuracy | .jcz bytes | paper ratio | minutes |")
    print("|---|---|---|---|---|---|---|")
    done: dict[tuple[int, int], dict] = {}  # several peers' files have the same size: run each target once
    for name, nominal, file_bytes in points:
        for label, target in (("nominal size", nominal), ("exported file", file_bytes)):
            if target >= fp32:
                print(f"| {name}: {label} | {target:,} | - | no compression needed: the dense model is smaller "
                      "| | | |", flush=True)
                continue
            for epochs in args.epochs:
                key = (round(target, -3), epochs)
                if key not in done:
                    done[key] = jointcomp_row(weights, f"{target}B", epochs, args.seed)
                    rows.append(done[key])
                row = done[key]
                print(f"| {name}: {label} | {target:,} | {epochs} | {row['accuracy']:.4f} | {row['file_bytes']:,} | "
                      f"{32 * sum(p.numel() for p in dense.parameters() if p.dim() > 1) / row['paper_bits']:.1f}x | "
                      f"{row['minutes']:.1f} |", flush=True)
    print("\n| target no peer reaches | epochs | jointcomp accuracy | .jcz bytes | MCT | torchao |")
    print("|---|---|---|---|---|---|")
    for target in args.beyond:
        for epochs in args.epochs:
            row = jointcomp_row(weights, target, epochs, args.seed, budget_mode="paper")
            rows.append(row)
            print(f"| {target} (paper) | {epochs} | {row['accuracy']:.4f} | {row['file_bytes']:,} | cannot: 2 bits is its "
                  "smallest weight | cannot: its files stay int8 |", flush=True)
    store_rows("peers", rows)


if __name__ == "__main__":
    main()
