"""The command line as a user runs it: real processes, real files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def jointcomp(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "jointcomp", *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr[-2000:]}")
    return result


def test_compress_digits_meets_target(tmp_path):
    out = tmp_path / "run"
    jointcomp("compress", "--model", "mlp", "--data", "digits", "--target", "50x", "--epochs", "15", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    dense_bits = 32 * sum(layer["numel"] for layer in summary["layers"])
    assert summary["target_bits"] == pytest.approx(dense_bits / 50)
    paper_size = sum(layer["bits"] * layer["nnz"] for layer in summary["layers"])
    assert paper_size == summary["size_bits"] <= summary["target_bits"]
    for key in ("ratio", "accuracy", "dense_accuracy", "epochs", "seconds"):
        assert key in summary
    assert summary["accuracy"] >= summary["dense_accuracy"] - 0.03
    lines = (out / "history.jsonl").read_text().splitlines()
    assert sum('"kind": "epoch"' in line for line in lines) == 20 + 15  # dense pre-training + ADMM
    assert (out / "train_state.pt").is_file()

    # the exported file: inspect tells its real size, evaluate reproduces the run's accuracy
    jcz = out / "model.jcz"
    assert summary["file_bytes"] == jcz.stat().st_size
    report = jointcomp("inspect", jcz).stdout
    assert f"file size: {jcz.stat().st_size} B" in report and "paper-accounting size" in report
    evaluated = jointcomp("evaluate", jcz, "--data", "digits").stdout
    assert f"accuracy {summary['accuracy']:.4f}" in evaluated
    jointcomp("export", out, "--out", tmp_path / "again.jcz")
    assert (tmp_path / "again.jcz").read_bytes() == jcz.read_bytes()
    jointcomp("decompress", jcz, "--out", tmp_path / "dense.safetensors")
    from safetensors.torch import load_file

    from jointcomp import load_compressed

    dense = load_file(str(tmp_path / "dense.safetensors"))
    decoded = load_compressed(jcz).state_dict()
    assert dense.keys() == decoded.keys()
    assert all(torch.equal(dense[k], decoded[k]) for k in dense)


def test_train_then_compress_pretrained_then_resume(tmp_path):
    jointcomp("train", "--model", "mlp", "--epochs", "5", "--out", tmp_path / "dense")
    dense = json.loads((tmp_path / "dense" / "summary.json").read_text())
    assert dense["accuracy"] > 0.85
    out = tmp_path / "run"
    jointcomp("compress", "--pretrained", tmp_path / "dense", "--target", "40x", "--epochs", "2", "--out", out)
    first = json.loads((out / "summary.json").read_text())
    assert first["epochs"] == 2
    # resuming a finished run re-issues its final result without training again
    jointcomp("compress", "--resume", out)
    assert json.loads((out / "summary.json").read_text())["size_bits"] == first["size_bits"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["compress", "--target", "0x", "--out", "X"], "must be a positive number"),
        (["compress", "--target", "1b", "--epochs", "1", "--out", "X"], "outside what this model can reach"),
        (["compress", "--data", "fashion-mnist", "--data-dir", "EMPTY", "--model", "lenet5", "--out", "X"], "apt-get install"),
        (["compress", "--pretrained", "NOWHERE", "--out", "X"], "no pretrained weights"),
        (["compress", "--resume", "EMPTY"], "no config.json"),
        (["compress", "--model", "lenet5", "--out", "X"], "28x28"),
        (["inspect", "NOWHERE"], "cannot read"),
        (["evaluate", "EMPTY"], "cannot read"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, args, message):
    (tmp_path / "EMPTY").mkdir()
    args = [str(tmp_path / a) if a in ("X", "EMPTY", "NOWHERE") else a for a in args]
    result = jointcomp(*args, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
