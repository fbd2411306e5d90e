"""A run's folder: config, history of records, resumable training state, summary.

Every file is written atomically (temporary file + rename), so an interrupted run never
leaves a half-written file behind, and `--resume` continues from the last whole epoch.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .records import Record, from_dict, to_json

STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.jsonl"
CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.jcz"
DENSE_FILE = "dense.safetensors"
RUN_FILES = (STATE_FILE, HISTORY_FILE, CONFIG_FILE, SUMMARY_FILE, MODEL_FILE, DENSE_FILE)
TMP_SUFFIX = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix;
    a failed write (disk full, no permission) leaves the old file and no temporary one."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    except BaseException:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


def writable_folder(path: str | os.PathLike) -> Path:
    """Create `path` if needed and check that files can be written in it; ValueError with
    one line saying what to do otherwise (checked before any training starts)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-check.", suffix=TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise ValueError(f"{path} is a file, not a folder; choose another --out") from None
    except NotADirectoryError:
        raise ValueError(f"{path} lies under a file, not a folder; choose another --out") from None
    except OSError as err:
        raise ValueError(f"cannot write in {path}: {err.strerror or err}; choose another --out") from None
    return path


class RunDir:
    """The files of one run in `path`.

    `RunDir(path)` starts a new run there: the folder is created, must be writable, and may
    not hold another run's files unless `overwrite=True` (they are then removed).
    `RunDir(path, resume=True)` opens an existing run and never creates anything. Either
    way, temporary files left by a run killed while saving are removed.
    """

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False) -> None:
        self.path = Path(path)
        if resume:
            if not (self.path / CONFIG_FILE).is_file():
                raise FileNotFoundError(f"{self.path} holds no {CONFIG_FILE}: nothing to resume there")
            writable_folder(self.path)
        else:
            writable_folder(self.path)
            found = [name for name in RUN_FILES if (self.path / name).exists()]
            if found and not overwrite:
                raise ValueError(
                    f"{self.path} already holds a run ({', '.join(found)}); continue it with --resume "
                    f"{self.path}, or start over with --overwrite"
                )
            for name in found:
                (self.path / name).unlink()
        for leftover in self.path.glob(f".*{TMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)
        self.history_lines = 0

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / CONFIG_FILE, config)

    def read_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} holds no {CONFIG_FILE}; is it a jointcomp run folder?")
        try:
            config = json.loads(path.read_text())
            if not isinstance(config, dict) or not isinstance(config.get("compress"), dict) or "model" not in config:
                raise ValueError
        except ValueError:
            raise ValueError(f"{path} is not a jointcomp run's config (damaged?); start a new run") from None
        return config

    def start_history(self) -> None:
        """Begin a fresh history (a new run)."""
        atomic_write(self.path / HISTORY_FILE, b"")
        self.history_lines = 0

    def append(self, record: Record) -> None:
        with open(self.path / HISTORY_FILE, "a") as f:
            f.write(to_json(record) + "\n")
        self.history_lines += 1

    def read_history(self) -> list[Record]:
        path = self.path / HISTORY_FILE
        if not path.is_file():
            return []
        return [from_dict(json.loads(line)) for line in path.read_text().splitlines() if line]

    def save_state(self, state: dict[str, Any]) -> None:
        """Save the training state together with how much history it accounts for. If the
        save fails (disk full, say), the previous state stays and no temporary file is left."""
        buffer = io.BytesIO()
        torch.save({**state, "history_lines": self.history_lines}, buffer)
        try:
            atomic_write(self.path / STATE_FILE, buffer.getbuffer())
        except OSError as err:
            raise OSError(f"cannot save the training state: {err}; the previous state is kept: "
                          "free some space and continue with --resume") from None

    def load_state(self) -> dict[str, Any]:
        """Load the training state (tensors only: never unpickles code) and trim the history
        back to the records it accounts for."""
        path = self.path / STATE_FILE
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            raise ValueError(f"cannot resume: {path} is damaged ({type(err).__name__}); start a new run") from err
        lines = (self.path / HISTORY_FILE).read_text().splitlines(keepends=True)
        self.history_lines = int(state["history_lines"])
        atomic_write(self.path / HISTORY_FILE, "".join(lines[: self.history_lines]).encode())
        return state

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY_FILE, summary)
