"""jointcomp against real peers at equal bytes: Sony's Model Compression Toolkit (mixed-precision
post-training quantization to a weights-memory target) and torchao (weight-only int8 / intx),
from the same dense LeNet-5 / Fashion-MNIST start as bench/quality.py.

    make bench-peers        # its own virtualenv, .venv-peers; the product never needs these packages

Each peer is run at the sizes it can reach and measured twice: its nominal size (MCT: its own
weights-memory count; torchao: its codes packed at their bits, plus float scales and the
layers it leaves alone) and the bytes of the file its own export writes. jointcomp then runs in
the file budget mode (the .jcz must fit) at each peer's bytes, with 1 and with --epochs epochs;
then at targets no peer reaches.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
import time
from importlib.metadata import version

import torch

from common import dense_model, machine
from jointcomp import EngineConfig, Engine, FinalRecord
from jointcomp.codec import fp32_bytes

CALIBRATION_IMAGES = 640  # MCT's representative data: 10 batches of 64 training images, no labels


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
        model = copy.deepcopy(dense)
        quantize_(model, config)
        scales = linear // group if group else sum(m.out_features for m in dense.modules() if isinstance(m, torch.nn.Linear))
        nominal = (bits * linear) // 8 + 4 * (rest + scales)  # its codes packed, float scales and the rest
        yield "torchao", name, "none", accuracy(model, data), nominal, torch_save_bytes(model), "torch.save"


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
        config = mct.core.CoreConfig(mixed_precision_config=mct.core.MixedPrecisionQuantizationConfig(num_of_images=64))
        target = mct.core.ResourceUtilization(weights_memory=fp32_bytes(dense) / ratio)
        try:
            with quiet_stdout():
                model, info = mct.ptq.pytorch_post_training_quantization(copy.deepcopy(dense), calibration,
                                                                         target_resource_utilization=target,
                                                                         core_config=config)
        except Exception:  # MCT raises when no bit assignment fits the target
            yield ("MCT", f"mixed precision, weights memory fp32/{ratio:g}", "-", None, None, None,
                   "cannot: no bit assignment fits (2 bits is its smallest)")
            continue
        bits = [q.num_bits for m in model.modules() for q in (getattr(m, "weights_quantizers", None) or {}).values()]
        with tempfile.TemporaryDirectory() as tmp, quiet_stdout():
            path = os.path.join(tmp, "model.pt")
            mct.exporter.pytorch_export_model(model, save_model_path=path, repr_dataset=calibration,
                                              serialization_format=mct.exporter.PytorchExportSerializationFormat.TORCHSCRIPT,
                                              quantization_format=mct.exporter.QuantizationFormat.FAKELY_QUANT)
            file_bytes = os.path.getsize(path)
        nominal = int(info.final_resource_utilization.weights_memory)
        yield ("MCT", f"mixed precision, weights memory fp32/{ratio:g} (bits {'/'.join(map(str, bits))})",
               f"{CALIBRATION_IMAGES} images", accuracy(model, data), nominal, file_bytes, "TorchScript (fake-quant)")


def jointcomp_run(dense, data, target: str, epochs: int, seed: int, budget_mode: str = "file") -> FinalRecord:
    config = EngineConfig(target=target, budget_mode=budget_mode, epochs=epochs, seed=seed)  # the CLI's defaults
    meta = {"model": "lenet5", "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    return next(r for r in Engine(copy.deepcopy(dense), data, config, meta=meta) if isinstance(r, FinalRecord))


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
    fp32 = fp32_bytes(dense)
    print(f"Machine: {machine()}; model-compression-toolkit {version('model-compression-toolkit')}, torchao "
          f"{version('torchao')}; LeNet-5 / Fashion-MNIST dense start (15 epochs, seed {args.seed}): accuracy "
          f"{accuracy(dense, data):.4f}, fp32 state dict {fp32:,} B, torch.save {torch_save_bytes(dense):,} B. "
          f"jointcomp trains on the 60,000 training images for the epochs shown.\n")
    print("| tool | setting | training data | accuracy | nominal size B | bytes of its exported file | export |")
    print("|---|---|---|---|---|---|---|")
    points = []
    for row in [*torchao_rows(dense, data), *mct_rows(dense, data, args.mct_ratios)]:
        tool, setting, used, acc, nominal, file_bytes, export = row
        cells = [f"{acc:.4f}" if acc is not None else "-", f"{nominal:,}" if nominal else "-",
                 f"{file_bytes:,}" if file_bytes else "-"]
        print(f"| {tool} | {setting} | {used} | {' | '.join(cells)} | {export} |", flush=True)
        if nominal:
            points.append((f"{tool} {setting}", nominal, file_bytes))
    if args.smallest_only:
        points = [min(points, key=lambda point: point[1])]
    print("\n| jointcomp at the bytes of | .jcz target B | epochs | accuracy | .jcz bytes | paper ratio | minutes |")
    print("|---|---|---|---|---|---|---|")
    done: dict[tuple[int, int], str] = {}  # several peers' files have the same size: run each target once
    for name, nominal, file_bytes in points:
        for label, target in (("nominal size", nominal), ("exported file", file_bytes)):
            if target >= fp32:
                print(f"| {name}: {label} | {target:,} | - | no compression needed: the dense model is smaller "
                      "| | | |", flush=True)
                continue
            for epochs in args.epochs:
                key = (round(target, -3), epochs)
                if key not in done:
                    tic = time.perf_counter()
                    final = jointcomp_run(dense, data, f"{target}B", epochs, args.seed)
                    done[key] = (f"{final.accuracy:.4f} | {final.file_bytes:,} | {final.ratio:.1f}x | "
                                 f"{(time.perf_counter() - tic) / 60:.1f}")
                print(f"| {name}: {label} | {target:,} | {epochs} | {done[key]} |", flush=True)
    print("\n| target no peer reaches | epochs | jointcomp accuracy | .jcz bytes | MCT | torchao |")
    print("|---|---|---|---|---|---|")
    for target in args.beyond:
        for epochs in args.epochs:
            final = jointcomp_run(dense, data, target, epochs, args.seed, budget_mode="paper")
            print(f"| {target} (paper) | {epochs} | {final.accuracy:.4f} | {final.file_bytes:,} | cannot: 2 bits is its "
                  "smallest weight | cannot: its files stay int8 |", flush=True)


if __name__ == "__main__":
    main()
