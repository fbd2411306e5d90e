"""A run's folder: config, history of records, resumable training state, summary.

Every file is written atomically (temporary file + rename), so an interrupted run never
leaves a half-written file behind, and `--resume` continues from the last whole epoch.
"""
from __future__ import annotations

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


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


class RunDir:
    """The files of one run in `path` (created if missing)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.history_lines = 0

    def has_state(self) -> bool:
        return (self.path / STATE_FILE).is_file()

    def write_config(self, config: dict[str, Any]) -> None:
        write_json(self.path / CONFIG_FILE, config)

    def read_config(self) -> dict[str, Any]:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{self.path} holds no {CONFIG_FILE}; is it a jointcomp run folder?")
        return json.loads(path.read_text())

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
        """Save the training state together with how much history it accounts for."""
        state = {**state, "history_lines": self.history_lines}
        tmp = self.path / f".{STATE_FILE}.tmp"
        torch.save(state, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path / STATE_FILE)

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
