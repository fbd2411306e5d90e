"""The command line as a user runs it: real processes, real files (its refusals in process: tests/command.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from command import refused

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


def test_compress_to_a_count_of_bit_operations(tmp_path):
    out = tmp_path / "run"
    result = jointcomp("compress", "--model", "mlp", "--data", "digits", "--budget-mode", "bops", "--target", "2%",
                       "--epochs", "3", "--dense-epochs", "3", "--out", out)
    printed = json.loads(result.stdout.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    # a Linear's weights work once per input: bit-operations = 8-bit activations x bits x non-zeros
    by_hand = sum(8 * layer["bits"] * layer["nnz"] for layer in summary["layers"])
    dense = 32 * 32 * sum(layer["numel"] for layer in summary["layers"])
    assert printed["bops"] == summary["bops"] == summary["size_bits"] == by_hand
    assert 0.9 * 0.02 * dense < by_hand <= summary["target_bits"] == pytest.approx(0.02 * dense)
    assert printed["bops_ratio"] == pytest.approx(dense / by_hand, abs=0.01)
    assert summary["budget_mode"] == "bops"


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
        (["compress", "--target", "1b", "--epochs", "1", "--out", "X"], "= 1 bits is outside what this model can reach: between 3 bits"),
        (["compress", "--data", "fashion-mnist", "--data-dir", "EMPTY", "--model", "lenet5", "--out", "X"], "apt-get install"),
        (["compress", "--pretrained", "NOWHERE", "--out", "X"], "no pretrained weights"),
        (["compress", "--pretrained", "PICKLE", "--out", "X"], "not a plain state dict"),
        (["compress", "--resume", "EMPTY"], "nothing to resume"),
        (["compress", "--resume", "NOWHERE"], "nothing to resume"),
        (["compress", "--model", "lenet5", "--out", "X"], "28x28"),
        (["compress", "--model", "os:system", "--out", "X"], "model factory 'os:system' failed"),
        (["compress", "--model", "no_such_module:make", "--out", "X"], "cannot load model factory"),
        (["compress", "--model", "torchvision:fasterrcnn_resnet50_fpn", "--out", "X"], "not a torchvision classification model"),
        (["compress", "--lr", "nan", "--out", "X"], "lr must be a finite number"),
        (["compress", "--lr", "inf", "--out", "X"], "lr must be a finite number"),
        (["compress", "--rho", "nan", "--out", "X"], "rho must be a positive finite number"),
        (["compress", "--budget-mode", "bops", "--target", "12KB", "--out", "X"], "unknown unit 'KB'"),
        (["compress", "--rho", "5", "--method", "uniform", "--out", "X"], "rho is not a setting of method uniform (it has none)"),
        (["compress", "--out", "FILE"], "is a file, not a folder"),
        (["compress", "--out", "FILE/run"], "lies under a file"),
        (["compress", "--out", "RUN"], "already holds a run"),
        (["compress", "--resume", "RUN", "--model", "lenet5"], "--model cannot change when resuming"),
        (["train", "--epochs", "0", "--out", "X"], "--epochs must be at least 1"),
        (["train", "--epochs", "-3", "--out", "X"], "--epochs must be at least 1"),
        (["inspect", "NOWHERE"], "cannot read"),
        (["evaluate", "EMPTY"], "cannot read"),
        (["export", "RUN", "--out", "FILE/model.jcz"], "config.json is not a jointcomp run's config"),
    ],
)
def test_bad_input_gives_one_clear_line(tmp_path, capsys, args, message):
    (tmp_path / "EMPTY").mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    (tmp_path / "RUN").mkdir()
    (tmp_path / "RUN" / "config.json").write_text("{}")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "PICKLE")  # a whole pickled model, not a state dict
    names = ("X", "EMPTY", "NOWHERE", "FILE", "FILE/run", "RUN", "PICKLE", "FILE/model.jcz")
    args = [str(tmp_path / a) if a in names else a for a in args]
    assert message in refused(capsys, *args)
    assert not (tmp_path / "NOWHERE").exists()  # a failed resume creates nothing
    assert (tmp_path / "RUN" / "config.json").read_text() == "{}"  # another run's files are never touched


def test_a_folder_without_write_permission_is_refused_before_training(tmp_path):
    """As an unprivileged user (root may write anywhere), in a folder it may not write."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    tmp_path.chmod(0o755)
    cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "jointcomp",
           "compress", "--out", str(locked / "run")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": str(REPO)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: cannot write in") and "Permission denied" in result.stderr
    assert "epoch" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs: room for a run's first files, not for its training state."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine does not let the test mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def test_disk_full_while_saving_keeps_the_old_state(tiny_disk):
    from jointcomp.rundir import RunDir

    run = RunDir(tiny_disk / "run")
    run.save_state({"w": torch.ones(1000)})
    with pytest.raises(OSError, match="No space left on device.*previous state is kept"):
        run.save_state({"w": torch.ones(100_000)})
    assert [p.name for p in (tiny_disk / "run").iterdir()] == ["train_state.pt"]  # no temporary file
    assert torch.equal(torch.load(tiny_disk / "run" / "train_state.pt")["w"], torch.ones(1000))

    result = jointcomp("compress", "--epochs", "1", "--dense-epochs", "1", "--out", tiny_disk / "cli", check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: cannot save")
    assert not list((tiny_disk / "cli").glob(".*.tmp"))


def test_divergence_then_resume_with_a_lower_lr(tmp_path):
    out = tmp_path / "run"
    failed = jointcomp("compress", "--dense-epochs", "1", "--epochs", "2", "--lr", "1e4", "--out", out, check=False)
    assert failed.returncode == 2
    assert "diverged" in failed.stderr and f"--resume {out} --lr 1000" in failed.stderr
    (out / ".train_state.pt.tmp").write_bytes(b"left by a kill during a save")
    jointcomp("compress", "--resume", out, "--lr", "0.05")
    assert not (out / ".train_state.pt.tmp").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_bits"] <= summary["target_bits"] and summary["accuracy"] > 0.5
    starts = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines() if '"start"' in line]
    assert [s["changes"] for s in starts] == [{}, {"lr": 0.05}]
    assert json.loads((out / "config.json").read_text())["compress"]["lr"] == 0.05


def test_overwrite_starts_over_and_extreme_targets_still_fit(tmp_path):
    out = tmp_path / "run"
    jointcomp("compress", "--dense-epochs", "1", "--epochs", "1", "--target", "20x", "--out", out)
    jointcomp("compress", "--dense-epochs", "1", "--epochs", "1", "--target", "500000x", "--out", out, "--overwrite")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_bits"] == pytest.approx(32 * (64 * 256 + 256 * 128 + 128 * 10) / 500000)
    assert summary["size_bits"] <= summary["target_bits"]
    config = json.loads((out / "config.json").read_text())
    assert config["compress"]["target"] == "500000x"


def test_image_folder_trains_and_compresses(tmp_path, image_folder, capsys):
    images = image_folder
    out = tmp_path / "run"
    jointcomp("compress", "--model", "mlp", "--data", f"folder:{images}", "--target", "20x", "--epochs", "3",
              "--dense-epochs", "10", "--out", out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["size_bits"] <= summary["target_bits"]
    assert summary["accuracy"] >= 0.8  # three digit classes, 30 validation images each
    evaluated = jointcomp("evaluate", out / "model.jcz", "--data", f"folder:{images}").stdout
    assert f"accuracy {summary['accuracy']:.4f} on folder:{images} (90 validation examples)" in evaluated

    (images / "val" / "digit0" / "broken.png").write_bytes(b"not an image")
    assert "broken.png is not a readable image" in refused(capsys, "evaluate", out / "model.jcz", "--data", f"folder:{images}")
    assert "needs train/ and val/ (or test/) folders" in refused(capsys, "evaluate", out / "model.jcz", "--data",
                                                                 f"folder:{tmp_path / 'nowhere'}")


def test_train_fine_tunes_from_pretrained_weights(tmp_path, capsys):
    jointcomp("train", "--model", "mlp", "--data", "digits", "--epochs", "3", "--out", tmp_path / "a")
    first = json.loads((tmp_path / "a" / "summary.json").read_text())["accuracy"]
    jointcomp("train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--pretrained", tmp_path / "a",
              "--out", tmp_path / "b")
    tuned = json.loads((tmp_path / "b" / "summary.json").read_text())["accuracy"]
    assert tuned >= first - 0.03  # it went on from the weights (one epoch from scratch scores far lower)
    jointcomp("train", "--model", "mlp", "--data", "digits", "--epochs", "1", "--out", tmp_path / "c")
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["accuracy"] < tuned
    assert "does not fit this model" in refused(capsys, "train", "--model", "lenet5", "--data", "fashion-mnist",
                                                "--pretrained", tmp_path / "a", "--out", tmp_path / "d")


def test_a_damaged_pretrained_checkpoint_is_one_line_naming_what_is_wrong(tmp_path, capsys):
    """An empty file, text named .pt, and weights whose bytes became NaN, infinite or huge: refused at
    load (the weights are broken in the file, not by training), exit 2, one line."""
    from jointcomp import build_model

    model = build_model("mlp", (1, 8, 8), 10)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("these are not weights\n")
    for name, value in (("nan", float("nan")), ("inf", float("inf")), ("huge", 3e38)):
        state = model.state_dict()
        state["3.weight"][5, 7] = value
        torch.save(state, tmp_path / f"{name}.pt")
    for name, says in (("empty", "damaged or not a checkpoint"), ("text", "damaged or not a checkpoint"),
                       ("nan", "3.weight"), ("inf", "3.weight"), ("huge", "3.weight")):
        assert says in refused(capsys, "compress", "--model", "mlp", "--data", "digits", "--pretrained",
                               tmp_path / f"{name}.pt", "--out", tmp_path / f"run-{name}"), name


def test_the_command_line_starts_without_pandas():
    """pandas makes the app's tables; a command line never needs it, and importing it was 0.5 s of
    every `python -m jointcomp` start (a sixth). The tables still come, pandas imported when made."""
    script = ("import sys, jointcomp.cli; print('pandas' in sys.modules); "
              "from jointcomp.records import epochs_frame; epochs_frame([]); print('pandas' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.split() == ["False", "True"], result.stderr[-2000:]
