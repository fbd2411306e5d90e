"""Accuracy at equal size and equal training: jointcomp's ADMM against the uniform and
sequential baselines (see jointcomp/methods.py), run exactly as a user runs them: every run
is a `python -m jointcomp` command with the defaults, only the target, method and seed given.

    python bench/quality.py                                  # LeNet-5 / Fashion-MNIST, 100x 600x 2000x
    python bench/quality.py --model mlp --data digits --targets 50x 200x 800x
    python bench/quality.py --budget-mode file --targets 20KB 12KB 8KB --methods admm
    python bench/quality.py --model nets:conv_bn --targets 500x --methods admm sequential   # bench/nets.py
    python bench/quality.py --model resnet20 --data cifar10 --pretrained ../shared/models/resnet20-12fca82f.th \
        --dense-epochs 3 --epochs 5 --targets 50x 200x --seeds 0 --jobs 2

Per seed, the dense start is `python -m jointcomp train --epochs N --seed S`; every run is
`python -m jointcomp compress --pretrained <that> --target T --method M --seed S`. Run folders
stay in bench/.cache/quality (a finished one is not run again, an unfinished one is resumed with
`compress --resume`, so an interrupted bench goes on).
Rows go to bench/results/quality.jsonl (one per run, replaced when run again). Prints one markdown
row per target, method and start: mean accuracy over the seeds with its
min-max, and the command of one of its runs.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import CACHE, commit, jointcomp, machine, paper_bits, store_rows
from jointcomp import BUDGET_MODES, EngineConfig
from jointcomp.methods import METHODS
from jointcomp.trainer import STARTS
from jointcomp.rundir import HISTORY_FILE, STATE_FILE, SUMMARY_FILE

RUNS = CACHE / "quality"


def compress_or_resume(args: list[str], out: Path) -> list[str]:
    """The run's `compress` command; where an interrupted bench left it unfinished, `--resume` from
    its last saved epoch (or `--overwrite` when it was stopped before saving one)."""
    if (out / STATE_FILE).is_file():
        return ["compress", "--resume", str(out)]
    return ["compress", *args, *(["--overwrite"] if out.exists() else [])]


def epoch_accuracy(out: Path) -> list[list[float]]:
    """[epoch, accuracy] of a run's deployable model after each epoch (-1: its calibrated start), from its history."""
    records = [json.loads(line) for line in (out / HISTORY_FILE).read_text().splitlines() if line.strip()]
    return [[r["epoch"], r["accuracy"]] for r in records if r.get("kind") == "epoch"]


def command(args: list[str]) -> str:
    return "python -m jointcomp " + shlex.join(args)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="lenet5")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--dense-epochs", type=int, default=15, help="of the `train` command that makes each dense start")
    p.add_argument("--pretrained", help="weights the dense starts are fine-tuned from (`train --pretrained`)")
    p.add_argument("--epochs", type=int, help="of each `compress` run (default: the CLI's)")
    p.add_argument("--targets", nargs="+", default=["100x", "600x", "2000x"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=tuple(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--budget-mode", default="paper", choices=tuple(BUDGET_MODES))
    p.add_argument("--starts", nargs="+", default=[EngineConfig.start], choices=STARTS,
                   help=f"where each run starts (`compress --start`; {EngineConfig.start} is the CLI's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs side by side (one thread each)")
    args = p.parse_args()

    base = ["--model", args.model, "--data", args.data]
    start = f"-from-{Path(args.pretrained).stem}" if args.pretrained else ""
    dense = {s: RUNS / f"dense-{args.model.replace(':', '.')}-{args.data}{start}-{args.dense_epochs}ep-seed{s}" for s in args.seeds}
    tune = ["--pretrained", args.pretrained] if args.pretrained else []
    todo = [[*base, *tune, "--epochs", str(args.dense_epochs), "--seed", str(s), "--out", str(d),
             *(["--overwrite"] if d.exists() else [])] for s, d in dense.items() if not (d / SUMMARY_FILE).is_file()]
    mode = ["--budget-mode", args.budget_mode] if args.budget_mode != "paper" else []
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    length = f"-{args.epochs}ep" if args.epochs else ""
    grid = {}
    rows = [(target, method, begin) for target in args.targets for method in args.methods for begin in args.starts]
    for target, method, begin in rows:
        for seed in args.seeds:
            out = RUNS / (f"{args.model.replace(':', '.')}-{args.data}{start}-{args.budget_mode}-{target}{length}-{method}"
                          f"{'-from-dense' if begin == 'dense' else ''}-seed{seed}")
            grid[target, method, begin, seed] = ([*base, "--pretrained", str(dense[seed]), "--target", target,
                                                  *(["--method", method] if method != "admm" else []), *mode, *epochs,
                                                  *(["--start", begin] if begin != EngineConfig.start else []),
                                                  "--seed", str(seed), "--out", str(out)], out)
    threads = 1 if args.jobs > 1 else None  # one thread each when runs go side by side
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda a: jointcomp(["train", *a], threads), todo))
        list(pool.map(lambda item: jointcomp(compress_or_resume(*item), threads),
                      [item for item in grid.values() if not (item[1] / SUMMARY_FILE).is_file()]))

    rows_data = []
    for (target, method, begin, seed), (cmd, out) in grid.items():
        summary = json.loads((out / SUMMARY_FILE).read_text())
        rows_data.append({
            "network": args.model, "data": args.data, "method": method, "start": begin, "target": target,
            "budget_mode": args.budget_mode, "seed": seed, "accuracy": summary["accuracy"],
            "dense_accuracy": summary["dense_accuracy"], "paper_bits": paper_bits(summary),
            "file_bytes": summary["file_bytes"], "bops": summary["bops"], "bops_ratio": summary["bops_ratio"],
            "epochs": summary["epochs"], "minutes": summary["seconds"] / 60,
            "bits": [layer["bits"] for layer in summary["layers"]], "epoch_accuracy": epoch_accuracy(out),
            "command": command(["compress", *cmd]).replace(str(RUNS) + "/", ""), "commit": commit(), "machine": machine()})
    store_rows("quality", rows_data)

    dense_acc = [json.loads((d / SUMMARY_FILE).read_text())["accuracy"] for d in dense.values()]
    print(f"Machine: {machine()}; {args.model} on {args.data}; seeds {args.seeds}; {args.jobs} run(s) at a time. "
          f"Dense starts: `python -m jointcomp train {shlex.join([*base, *tune])} --epochs {args.dense_epochs} --seed S "
          f"--out DENSE` (accuracy {', '.join(f'{a:.4f}' for a in dense_acc)}). Every run: the command in its row, "
          "with the CLI's defaults.\n")
    print("| target | method | start | accuracy mean (min-max) | loss to dense (points) | paper ratio | file bytes | bits per layer (seed "
          f"{args.seeds[0]}) | minutes per run | command (seed {args.seeds[0]}) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for target, method, begin in rows:
        runs = [json.loads((grid[target, method, begin, s][1] / SUMMARY_FILE).read_text()) for s in args.seeds]
        accs = [r["accuracy"] for r in runs]
        loss = statistics.mean(r["dense_accuracy"] - r["accuracy"] for r in runs) * 100
        bits = ",".join(str(layer["bits"]) for layer in runs[0]["layers"])
        cmd = command(["compress", *grid[target, method, begin, args.seeds[0]][0]]).replace(str(RUNS) + "/", "")
        print(f"| {target} | {method} | {begin} | {statistics.mean(accs):.4f} ({min(accs):.4f}-{max(accs):.4f}) | {loss:.2f} | "
              f"{statistics.mean(r['ratio'] for r in runs):.1f}x | {statistics.mean(r['file_bytes'] for r in runs):,.0f} | "
              f"{bits} | {statistics.mean(r['seconds'] for r in runs) / 60:.1f} | `{cmd}` |", flush=True)


if __name__ == "__main__":
    main()
