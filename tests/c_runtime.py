"""Compile a C export with the system compiler and run it: the harness feeds jc_predict one
input at a time from stdin (float32) and writes its outputs to stdout."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import torch

CC = shutil.which("gcc") or shutil.which("cc")
FLAGS = ["-std=c99", "-Wall", "-Wextra", "-Werror", "-O2"]
HARNESS = r"""
#include <stdio.h>
#include "model.h"
int main(void)
{
    float in[JC_INPUT_SIZE], out[JC_OUTPUT_SIZE];
    while (fread(in, sizeof(float), JC_INPUT_SIZE, stdin) == JC_INPUT_SIZE) {
        jc_predict(in, out);
        fwrite(out, sizeof(float), JC_OUTPUT_SIZE, stdout);
    }
    return 0;
}
"""


def compile_c(folder: Path) -> Path:
    """The export in `folder` built with the harness, warnings as errors; the program's path."""
    assert CC, "no C compiler: `make system-deps` installs gcc"
    (folder / "harness.c").write_text(HARNESS)
    program = folder / "predict"
    subprocess.run([CC, *FLAGS, "-I", str(folder), str(folder / "model.c"), str(folder / "harness.c"),
                    "-o", str(program)], check=True, capture_output=True, text=True)
    return program


def run_c(program: Path, inputs: torch.Tensor) -> torch.Tensor:
    """The C model's outputs for a batch of inputs, one row each."""
    x = inputs.float().contiguous().numpy()
    out = subprocess.run([str(program)], input=x.tobytes(), capture_output=True, check=True).stdout
    return torch.from_numpy(np.frombuffer(out, np.float32).copy()).view(len(inputs), -1)


def const_bytes(folder: Path) -> int:
    """Bytes of the read-only data objects the compiler placed for model.c (from the object
    file's symbol table: every const array is one sized symbol)."""
    obj = folder / "model.o"
    subprocess.run([CC, *FLAGS, "-c", str(folder / "model.c"), "-o", str(obj)], check=True)
    symbols = subprocess.run(["nm", "-S", "--defined-only", str(obj)], check=True, capture_output=True,
                             text=True).stdout
    return sum(int(size, 16) for _, size, kind, _ in (line.split() for line in symbols.splitlines()
                                                         if len(line.split()) == 4) if kind in "rR")
