"""Training throughput of compression under torchrun: 1 and 2 processes on this machine's
CPU (gloo), LeNet-5 on Fashion-MNIST, one compression epoch at a global batch of 128.

    cd bench && ../.venv/bin/python distributed.py

Samples per second = 60,000 training images / the epoch's seconds from the run's history
(the epoch's training steps and its projections; evaluation excluded). On a GPU machine the
same command runs with nccl (--device cuda).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import machine

REPO = Path(__file__).resolve().parents[1]


def epoch_seconds(processes: int, device: str, threads: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        args = ["-m", "jointcomp", "compress", "--model", "lenet5", "--data", "fashion-mnist", "--target", "600x",
                "--epochs", "2", "--dense-epochs", "0", "--batch-size", str(128 // processes), "--device", device,
                "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run((launcher if processes > 1 else [sys.executable]) + args, cwd=REPO, env=env, check=True,
                       capture_output=True)
        epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
        return [e["seconds"] for e in epochs if e["kind"] == "epoch"][0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"Machine: {machine()}; device {args.device}")
    print("| processes | threads each | global batch | epoch s | samples/s | vs 1 process |")
    print("|---|---|---|---|---|---|")
    base = None
    for n in args.processes:
        threads = max(1, cores // n)
        seconds = epoch_seconds(n, args.device, threads)
        base = base or seconds
        print(f"| {n} | {threads} | 128 | {seconds:.1f} | {60000 / seconds:,.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
