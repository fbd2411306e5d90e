"""The C export on a real microcontroller target: cross-compiled for a Cortex-M4 with Debian's
arm-none-eabi-gcc and run under qemu-system-arm (mps2-an386) with semihosting.

    apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm
    python bench/mcu.py [--images 20] [--models mlp lenet5 resnet20]

For each model and target: the flash and RAM of the model's own object file
(arm-none-eabi-size: text = code + const data, bss = the activation arena), the firmware
with the semihosting harness, whether the emulated board predicts what PyTorch predicts
on validation images, and emulated instructions per inference (QEMU's -icount shift=0 runs
one instruction per virtual ns; SysTick counts the board's 25 MHz clock, so the figure has a
granularity of 40 instructions).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

from common import dense_model
from jointcomp import Compressor, build_model, load_dataset
from jointcomp.models import load_weights, published_checkpoints
from jointcomp.deploy.c import export_c

HERE = Path(__file__).resolve().parent / "mcu"
BUILD = Path(__file__).resolve().parent / ".cache" / "mcu"
CFLAGS = ["-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16", "-std=c99", "-Wall", "-Werror", "-O2"]
# (model, data, dense epochs or None for the published checkpoint in $JOINTCOMP_MODELS, target)
CASES = [("mlp", "digits", 20, "50x"), ("lenet5", "fashion-mnist", 10, "100x"), ("lenet5", "fashion-mnist", 10, "600x"),
         ("resnet20", "cifar10", None, "200x")]


def start(model_name: str, data_name: str, epochs: int | None):
    """The dense model a case starts from, and its data."""
    if epochs is not None:
        return dense_model(model_name, data_name, epochs)
    found = published_checkpoints(model_name)
    if not found:
        raise SystemExit(f"no published {model_name} checkpoint: set JOINTCOMP_MODELS (e.g. ../shared/models)")
    data = load_dataset(data_name)
    return load_weights(build_model(model_name, data.input_shape, data.num_classes), found[0]).eval(), data


def size(path: Path) -> tuple[int, int, int]:
    """(text, data, bss) from arm-none-eabi-size."""
    line = subprocess.run(["arm-none-eabi-size", str(path)], check=True, capture_output=True, text=True).stdout
    text, data, bss = line.splitlines()[1].split()[:3]
    return int(text), int(data), int(bss)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=20, help="validation images run on the emulated board")
    p.add_argument("--models", nargs="+", default=sorted({case[0] for case in CASES}), help="only these models' rows")
    args = p.parse_args()
    for tool in ("arm-none-eabi-gcc", "qemu-system-arm"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing: apt-get install gcc-arm-none-eabi libnewlib-arm-none-eabi qemu-system-arm")
    version = subprocess.run(["arm-none-eabi-gcc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"Cortex-M4 (hard float), {version}, -O2; QEMU mps2-an386, {args.images} validation images per row. "
          "Each model is the allocation of one joint projection of the dense start at that target (its sizes "
          "are those of a trained run at the same target; the accuracy is not the point here).\n")
    print("| model | target | .jcz B | C flash reported B | model.o text (code + const) B | model.o bss (RAM) B | "
          "firmware text / data / bss B | same predictions | max abs diff | instructions per inference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model_name, data_name, epochs, target in [case for case in CASES if case[0] in args.models]:
        model, data = start(model_name, data_name, epochs)
        folder = BUILD / f"{model_name}_{target}"
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"model": model_name, "input_shape": list(data.input_shape), "num_classes": data.num_classes}
        comp = Compressor(model, target=target, steps=1, meta=meta)
        comp.finish()
        comp.convert_()
        jcz = comp.export(str(folder / "model.jcz"))
        export = export_c(folder / "model.jcz", folder)
        subprocess.run(["arm-none-eabi-gcc", *CFLAGS, "-c", str(folder / "model.c"), "-o", str(folder / "model.o")],
                       check=True)
        text, _, bss = size(folder / "model.o")
        subprocess.run(["arm-none-eabi-gcc", *CFLAGS, "--specs=rdimon.specs", "-nostartfiles", "-T", str(HERE / "mps2.ld"),
                        "-I", str(folder), str(HERE / "startup.c"), str(HERE / "main.c"), str(folder / "model.c"),
                        "-o", str(folder / "firmware.elf")], check=True)
        firmware = size(folder / "firmware.elf")
        x = data.val_x[: args.images].float().contiguous()
        (folder / "inputs.bin").write_bytes(x.numpy().tobytes())
        run = subprocess.run(["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-serial", "none",
                              "-semihosting-config", "enable=on,target=native", "-icount", "shift=0",
                              "-kernel", str(folder / "firmware.elf")],
                             cwd=folder, check=True, capture_output=True, text=True, timeout=600)
        instructions = int(run.stdout.split("instructions ")[1].split()[0])
        board = torch.from_numpy(np.frombuffer((folder / "outputs.bin").read_bytes(), np.float32).copy())
        board = board.view(len(x), -1)
        with torch.no_grad():
            reference = model(x)
        same = bool(torch.equal(board.argmax(1), reference.argmax(1)))
        diff = (board - reference).abs().max().item()
        print(f"| {model_name} | {target} | {jcz:,} | {export.flash_bytes:,} | {text:,} | {bss:,} | "
              f"{firmware[0]:,} / {firmware[1]:,} / {firmware[2]:,} | {'yes' if same else 'NO'} ({len(x)} images) "
              f"| {diff:.1e} | {instructions:,} |")


if __name__ == "__main__":
    main()
