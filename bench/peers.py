"""jointcomp against real peers at equal bytes: Sony's Model Compression Toolkit (mixed-precision
post-training quantization to a weights-memory target) and torchao (weight-only int8 / intx),
from the same dense start: by default LeNet-5 / Fashion-MNIST as bench/quality.py trains it, or
published weights (--model resnet20 --data cifar10 --pretrained ...).

    make bench-peers        # its own virtualenv, .venv-peers; the product never needs these packages

Each peer is run at the sizes it can reach and measured twice: its nominal size (MCT: its own
weights-memory count; torchao: its codes packed at their bits, plus float scales and the
layers it leaves alone) and the bytes of the file its own export writes. jointcomp then runs in
the file budget mode (the .jcz must fit) at each peer's bytes: post-training (`--method
posttrain`, like the peers, no training) and admm trained for each of --epochs
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
from jointcomp.models import load_start
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


def jointcomp_row(start: Start, target: str, method: str, epochs: int, seed: int, budget_mode: str = "file") -> dict:
    """`python -m jointcomp compress` from the dense start at `target` with the CLI's defaults: `method`
    admm trained for `epochs`, or posttrain (no training), as a row."""
    out = RUNS / f"{start.network}-{method}-{budget_mode}-{target}-{epochs}ep-seed{seed}"
    how = ["--epochs", str(epochs)] if method != "posttrain" else ["--method", "posttrain"]
    cmd = ["compress", "--model", start.network, "--data", start.data, "--pretrained", str(start.weights),
           "--target", target, *(["--budget-mode", budget_mode] if budget_mode != "paper" else []), *how,
           "--seed", str(seed), "--out", str(out), "--overwrite"]
    seconds = jointcomp(cmd)
    summary = json.loads((out / SUMMARY_FILE).read_text())
    return {"network": start.network, "data": start.data, "method": method,
            **({"start": EngineConfig.start} if method != "posttrain" else {}), "target": target,
            "budget_mode": budget_mode, "seed": seed, "accuracy": summary["accuracy"],
            "dense_accuracy": summary["dense_accuracy"], "paper_bits": paper_bits(summary),
            "file_bytes": summary["file_bytes"], "bops": summary["bops"], "bops_ratio": summary["bops_ratio"],
            "epochs": epochs if method != "posttrain" else 0, "minutes": seconds / 60,
            "command": "python -m jointcomp " + shlex.join(cmd[:-3]).replace(str(CACHE) + "/", ""),
            "commit": commit(), "machine": machine()}


def peer_row(peer: Peer, start: Start, dense_accuracy: float, seed: int) -> dict:
    """A peer's result as a row: its tool is the method, its own setting the target (in its own terms)."""
    return {"network": start.network, "data": start.data, "method": peer.tool, "target": peer.target,
            "budget_mode": "its own", "seed": seed, "accuracy": peer.accuracy, "dense_accuracy": dense_accuracy,
            "file_bytes": peer.file_bytes, "nominal_bytes": peer.nominal, "setting": peer.setting, "export": peer.export,
            "epochs": 0, "minutes": peer.seconds / 60, "command": f"cd bench && python peers.py {start.arguments} --seed {seed}",
            "commit": commit(), "machine": machine()}


@dataclass
class Start:
    """The dense network every tool starts from, and the arguments of this bench that name it."""

    network: str
    data: str
    weights: Path
    arguments: str


def dense_start(args) -> tuple[torch.nn.Module, object, Start]:
    """The published weights given (--pretrained), or a dense model trained by the bench (cached)."""
    if args.pretrained:
        model, data = load_start(args.model, args.data, pretrained=args.pretrained)
        weights, named = Path(args.pretrained).resolve(), f"--pretrained {args.pretrained}"
    else:
        model, data = dense_model(args.model, args.data, args.dense_epochs, args.seed)
        weights, named = dense_weights(args.model, args.data, args.dense_epochs, args.seed), ""
    arguments = " ".join(filter(None, [f"--model {args.model} --data {args.data}", named]))
    return model.eval(), data, Start(args.model, args.data, weights, arguments)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--pretrained", help="published dense weights (else a `train` run of --dense-epochs, cached)")
    p.add_argument("--dense-epochs", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, nargs="*", default=[1, 15],
                   help="admm's training epochs at each peer's bytes (none: post-training only)")
    p.add_argument("--tools", nargs="+", default=["torchao", "mct"], choices=["torchao", "mct"])
    p.add_argument("--mct-ratios", type=float, nargs="+", default=[4, 8, 16, 17],
                   help="MCT weights-memory targets, as fp32 bytes / ratio (2 bits everywhere is about 16)")
    p.add_argument("--beyond", nargs="*", default=["100x", "600x"], help="paper targets no peer reaches")
    p.add_argument("--smallest-only", action="store_true",
                   help="run jointcomp only at the smallest size a peer reached (for long runs)")
    args = p.parse_args()
    dense, data, start = dense_start(args)
    fp32, dense_accuracy = fp32_bytes(dense), accuracy(dense, data)
    print(f"Machine: {machine()}; model-compression-toolkit {version('model-compression-toolkit')}, torchao "
          f"{version('torchao')}; {start.network} / {start.data} dense start ({start.arguments}, seed {args.seed}): "
          f"accuracy {dense_accuracy:.4f}, fp32 state dict {fp32:,} B, torch.save {torch_save_bytes(dense):,} B.\n")
    print("| tool | setting | training data | accuracy | nominal size B | bytes of its exported file | export |")
    print("|---|---|---|---|---|---|---|")
    rows, points = [], []
    peers = [*(torchao_rows(dense, data) if "torchao" in args.tools else []),
             *(mct_rows(dense, data, args.mct_ratios) if "mct" in args.tools else [])]
    for peer in peers:
        cells = [f"{peer.accuracy:.4f}" if peer.accuracy is not None else "-", f"{peer.nominal:,}" if peer.nominal else "-",
                 f"{peer.file_bytes:,}" if peer.file_bytes else "-"]
        print(f"| {peer.tool} | {peer.setting} | {peer.used} | {' | '.join(cells)} | {peer.export} |", flush=True)
        if peer.nominal:
            rows.append(peer_row(peer, start, dense_accuracy, args.seed))
            points.append((f"{peer.tool} {peer.setting}", peer.nominal, peer.file_bytes))
    if args.smallest_only:
        points = [min(points, key=lambda point: point[1])]
    runs = [("posttrain", 0), *(("admm", epochs) for epochs in args.epochs)]
    print("\n| jointcomp at the bytes of | .jcz target B | method | epochs | accuracy | .jcz bytes | paper ratio | minutes |")
    print("|---|---|---|---|---|---|---|---|")
    done: dict[tuple, dict] = {}  # several peers' files have the same size: run each target once
    for name, nominal, file_bytes in points:
        for label, target in (("nominal size", nominal), ("exported file", file_bytes)):
            if target >= fp32:
                print(f"| {name}: {label} | {target:,} | - | - | no compression needed: the dense model is smaller "
                      "| | | |", flush=True)
                continue
            for method, epochs in runs:
                key = (round(target, -3), method, epochs)
                if key not in done:
                    done[key] = jointcomp_row(start, f"{target}B", method, epochs, args.seed)
                    rows.append(done[key])
                row = done[key]
                print(f"| {name}: {label} | {target:,} | {method} | {epochs} | {row['accuracy']:.4f} | "
                      f"{row['file_bytes']:,} | "
                      f"{32 * sum(p.numel() for p in dense.parameters() if p.dim() > 1) / row['paper_bits']:.1f}x | "
                      f"{row['minutes']:.1f} |", flush=True)
    print("\n| target no peer reaches | method | epochs | jointcomp accuracy | .jcz bytes | MCT | torchao |")
    print("|---|---|---|---|---|---|---|")
    for target in args.beyond:
        for method, epochs in runs:
            row = jointcomp_row(start, target, method, epochs, args.seed, budget_mode="paper")
            rows.append(row)
            print(f"| {target} (paper) | {method} | {epochs} | {row['accuracy']:.4f} | {row['file_bytes']:,} | cannot: 2 "
                  "bits is its smallest weight | cannot: its files stay int8 |", flush=True)
    store_rows("peers", rows)


if __name__ == "__main__":
    main()
