"""What a run reports, as plain dataclasses, and its history as tidy pandas tables.

The engine yields these records; the app, notebooks, CLI and files consume only them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class StartRecord:
    """Sent once before training: what will run."""

    total_epochs: int
    steps_per_epoch: int
    dense_epochs: int
    dense_bits: float
    target_bits: float
    layers: list[str]
    device: str
    resumed_at: int = 0  # epochs already done when a run is resumed
    changes: dict[str, Any] = field(default_factory=dict)  # settings a resumed run changed
    kind: str = "start"


@dataclass
class StepRecord:
    """One optimizer step."""

    phase: str  # "dense" (pre-training), "admm" (compression; "prune" for the baselines), "retrain" (masks, bits fixed), "finetune" (deployed shape)
    step: int
    epoch: int
    loss: float
    lr: float
    kind: str = "step"


@dataclass
class LayerRecord:
    """One compressed layer at the end of an epoch (deployable model)."""

    name: str
    numel: int
    nnz: int
    density: float
    bits: int
    residual: float  # ||W - V||^2
    dual_norm: float  # ||U||
    label: str = ""  # what the layer is, for people: "Linear 64→256", "Conv2d 1→20, 5x5"


@dataclass
class CurvePoint:
    """One point of the trade-off curve: what the current weights would score if projected
    to another size (no training), on a fixed validation subset."""

    size_bits: float
    file_bytes: int
    accuracy: float


@dataclass
class EpochRecord:
    """End of an epoch: the deployable model's accuracy and size, and the multipliers."""

    phase: str
    epoch: int
    step: int
    accuracy: float
    size_bits: float
    ratio: float
    target_bits: float
    lambda_prune: float
    lambda_quant: float
    primal_residual: float
    dual_norm: float
    seconds: float
    layers: list[LayerRecord] = field(default_factory=list)
    note: str = ""  # an event of this epoch worth telling (e.g. the final phase restarted)
    file_bytes: int = 0  # of the .jcz this epoch's deployable model would make (0: not measured)
    curve: list[CurvePoint] = field(default_factory=list)  # the trade-off around the target, when asked for
    kind: str = "epoch"


@dataclass
class FinalRecord:
    """The end of a run: the deployable model that was checked to fit."""

    accuracy: float
    dense_accuracy: float
    size_bits: float
    target_bits: float
    ratio: float
    epochs: int
    seconds: float
    stopped: bool
    file_bytes: int = 0  # the exported .jcz
    file_ratio: float = 0.0  # fp32 state dict bytes / file bytes
    layers: list[LayerRecord] = field(default_factory=list)
    bops: float = 0.0  # bit-operations of one forward pass (bops.py; 0: not counted, the input's shape unknown)
    bops_ratio: float = 0.0  # the dense model's (32 x 32 bits) / bops
    kind: str = "final"

    def summary(self) -> dict[str, Any]:
        """The result as summary.json and the app's tables hold it: the figures, and each
        layer's kept count and bitwidth."""
        figures = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("layers", "kind")}
        layers = [{"name": l.name, "numel": l.numel, "nnz": l.nnz, "bits": l.bits} for l in self.layers]
        return {**figures, "size_kb": self.size_bits / 8000, "layers": layers}


Record = StartRecord | StepRecord | EpochRecord | FinalRecord
_KINDS = {cls.kind: cls for cls in (StartRecord, StepRecord, EpochRecord, FinalRecord)}  # type: ignore[attr-defined]


def to_dict(record: Record) -> dict[str, Any]:
    return dataclasses.asdict(record)


def to_json(record: Record) -> str:
    return json.dumps(to_dict(record), allow_nan=True)


def from_dict(data: dict[str, Any]) -> Record:
    """Rebuild a record written by `to_dict` (e.g. a line of history.jsonl)."""
    cls = _KINDS.get(data.get("kind", ""))
    if cls is None:
        raise ValueError(f"not a jointcomp record: kind={data.get('kind')!r}")
    data = dict(data)
    if "layers" in data and cls is not StartRecord:
        data["layers"] = [LayerRecord(**layer) for layer in data["layers"]]
    if "curve" in data:
        data["curve"] = [CurvePoint(**point) for point in data["curve"]]
    return cls(**data)


def _frame(rows: list[dict[str, Any]], columns: list[str]) -> pd.DataFrame:
    """A pandas table of `rows`; pandas is imported here, not with the records (0.5 s of a 3.2 s command
    line start on a 2-core CPU, and no command makes a table)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=columns)


def steps_frame(history: Iterable[Record]) -> pd.DataFrame:
    """One row per optimizer step."""
    rows = [to_dict(r) for r in history if isinstance(r, StepRecord)]
    return _frame(rows, [f.name for f in dataclasses.fields(StepRecord)])


def epochs_frame(history: Iterable[Record]) -> pd.DataFrame:
    """One row per epoch (without the per-layer detail)."""
    cols = [f.name for f in dataclasses.fields(EpochRecord) if f.name not in ("layers", "curve")]
    rows = [{c: getattr(r, c) for c in cols} for r in history if isinstance(r, EpochRecord)]
    return _frame(rows, cols)


def layers_frame(history: Iterable[Record]) -> pd.DataFrame:
    """One row per epoch x layer, for the compression epochs."""
    cols = ["epoch"] + [f.name for f in dataclasses.fields(LayerRecord)]
    rows = [
        {"epoch": r.epoch, **dataclasses.asdict(layer)}
        for r in history
        if isinstance(r, EpochRecord)
        for layer in r.layers
    ]
    return _frame(rows, cols)


def curve_frame(history: Iterable[Record]) -> pd.DataFrame:
    """One row per epoch x point of the trade-off curve."""
    cols = ["epoch", "phase"] + [f.name for f in dataclasses.fields(CurvePoint)]
    rows = [
        {"epoch": r.epoch, "phase": r.phase, **dataclasses.asdict(point)}
        for r in history
        if isinstance(r, EpochRecord)
        for point in r.curve
    ]
    return _frame(rows, cols)
