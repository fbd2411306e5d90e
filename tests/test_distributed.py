"""torchrun on the CPU (gloo, 2 processes): the CLI's trainer, a user's own DDP loop, and a
process killed mid-run. Real processes, real files."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores


def run(args, timeout=600):
    result = subprocess.run(args, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def compress(out: Path, *extra: str) -> list[str]:
    return ["-m", "jointcomp", "compress", "--model", "mlp", "--data", "digits", "--target", "50x", "--epochs", "4",
            "--dense-epochs", "4", "--device", "cpu", "--out", str(out), *extra]


def epoch_accuracies(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [line["accuracy"] for line in lines if line["kind"] == "epoch"]


def test_two_processes_match_one_at_the_global_batch(tmp_path):
    """Tolerance: 2 processes at batch 64 see the batches 1 process sees at batch 128 (the
    digits' odd count pads one example; sums run in another order), so every epoch's
    accuracy stays within 2 points of the single process's, and both meet the target."""
    run(TORCHRUN + compress(tmp_path / "two"))
    run([sys.executable] + compress(tmp_path / "one", "--batch-size", "128"))
    two, one = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("two", "one"))
    for summary in (two, one):
        assert summary["size_bits"] <= summary["target_bits"]
    assert two["target_bits"] == one["target_bits"]
    acc_two, acc_one = epoch_accuracies(tmp_path / "two"), epoch_accuracies(tmp_path / "one")
    assert len(acc_two) == len(acc_one) == 8
    assert max(abs(a - b) for a, b in zip(acc_two, acc_one)) <= 0.02
    history = (tmp_path / "two" / "history.jsonl").read_text().splitlines()
    steps = sum('"kind": "step"' in line for line in history)
    assert steps == 8 * 12  # ceil(ceil(1437 / 2) / 64) steps an epoch: the global batch is 2 x 64


def test_user_loop_under_ddp_takes_one_allocation(tmp_path):
    out = tmp_path / "loop.json"
    run(TORCHRUN + [str(REPO / "tests" / "ddp_loop.py"), str(out)])
    result = json.loads(out.read_text())
    assert len(result["projections"]) >= 4
    for per_rank in result["projections"]:  # V of every process, after every projection
        assert per_rank[0] == per_rank[1]
    first, second = result["final"]
    assert first == second  # masks, codebooks, codes, bits and the target
    assert result["target_bits"] == pytest.approx(result["dense_bits"] / 80)  # rank 0's move reached rank 1
    assert result["size_bits"] <= result["target_bits"]


def test_a_killed_process_leaves_a_run_that_resumes(tmp_path):
    out = tmp_path / "run"
    args = TORCHRUN + ["-m", "jointcomp", "compress", "--model", "mlp", "--data", "digits", "--target", "50x",
                       "--epochs", "12", "--dense-epochs", "3", "--device", "cpu", "--out", str(out)]
    launcher = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for two compression epochs on disk
            history = out / "history.jsonl"
            if history.is_file() and history.read_text().count('"phase": "admm", "epoch"') >= 2:
                break
            assert launcher.poll() is None, launcher.communicate()[1][-2000:]
            time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGKILL)  # rank 1 dies
        _, stderr = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert launcher.returncode != 0
    assert "Root Cause" in stderr and "SIGKILL" in stderr  # torchrun names the process that died
    assert "summary.json" not in os.listdir(out) and (out / "train_state.pt").is_file()

    resumed = run(TORCHRUN + ["-m", "jointcomp", "compress", "--resume", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_bits"] <= summary["target_bits"] and summary["epochs"] > 0
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["ratio"] >= 50 * (1 - 1e-9)
    epochs = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == list(range(3 + 12))  # no epoch lost or repeated


DRIFTING = """
import sys, torch, torch.distributed as dist, jointcomp
dist.init_process_group("gloo")
torch.manual_seed(dist.get_rank())  # each process its own weights, and no DDP to keep them equal
model = jointcomp.build_model("mlp", (64,), 10)
comp = jointcomp.Compressor(model, target="40x", steps=10)
try:
    comp.step(lr=0.1)  # the first step projects
except RuntimeError as error:  # one file per process: their prints on one pipe interleave
    open(f"{sys.argv[1]}/stopped-{dist.get_rank()}.txt", "w").write(str(error))
jointcomp.distributed.leave()
"""


def test_processes_whose_allocations_differ_are_stopped(tmp_path):
    script = tmp_path / "drifting.py"
    script.write_text(DRIFTING)
    run(TORCHRUN + [str(script), str(tmp_path)])
    for rank in (0, 1):
        stopped = tmp_path / f"stopped-{rank}.txt"
        assert stopped.is_file(), f"process {rank} went on"
        assert stopped.read_text().startswith("the processes of this distributed run disagree on the allocation")
