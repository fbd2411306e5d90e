"""Altair charts of a run's records, shared by the app and the notebooks.

Each builder takes the tidy frames of records.py (or a codec Report) and returns a chart.
"""
from __future__ import annotations

import math

import altair as alt
import pandas as pd
from altair.utils.data import to_values

from ..budget_modes import BUDGET_MODES
from ..codec import Report

WIDTH = 320
HEIGHT = 300  # the whole chart (title, legend, axes) in Streamlit, which fits the height
PHASES = {"dense": "dense", "posttrain": "calibrated start", "admm": "ADMM", "prune": "pruning", "retrain": "retraining", "finetune": "final phase"}
MULTIPLIERS = {"lambda_prune": "pruning", "lambda_quant": "joint"}  # what each prices: the caption beside the chart
EPOCH_AXIS = alt.Axis(tickMinStep=1, format="d")
LOG_AXIS = alt.Axis(format=".0e", tickCount=4)
ACCURACY_SCALE = alt.Scale(zero=False, padding=10)  # the best point inside the plot: on its edge it was cut in half
ACCURACY_AXIS = alt.Axis(format=".1%", tickCount=5, tickMinStep=0.001)  # ticks 0.1 % apart at least: no two read the same
# One row above the chart, so its labels are short: longer rows ran past its right edge in the page's columns.
LEGEND = alt.Legend(orient="top", direction="horizontal", title=None, labelLimit=200)
# Legends of per-layer charts sit above the rows: beside a chart of a few layers, a legend of 8
# bitwidths (or a colour gradient) is taller than the chart and ran past its bottom edge.
# a short gradient: beside 20 layer names a 200-pixel one ran past the chart, its last labels cut off
LAYER_LEGEND = alt.Legend(orient="top", direction="horizontal", gradientLength=100)
# the eight bitwidths in two rows: in one, 6, 7 and 8 ran past the edge of a chart in a third of the page
BITS_LEGEND = alt.Legend(orient="top", direction="horizontal", columns=4)
AXIS_UNITS = {"b": (8000, "KB"), "bops": (1e6, "MBOPs")}  # by an accounting's unit: bits per axis unit, its name
PRICED = {"b": "bit", "bops": "bit-operation"}  # by an accounting's unit: what one unit of budget is, in words
LOSS_POINTS = 500  # the most points the loss chart draws: a long run's steps are thinned evenly


def vega_lite(chart: alt.Chart | alt.LayerChart) -> dict:
    """The chart as a Vega-Lite dict, its data inline, whichever data transformer Altair has
    active. The transformer is global to all threads, and Streamlit switches it while it converts
    any session's `st.altair_chart`: a plain `to_dict()` in another session's thread at that
    moment left the data out of the spec (an empty chart; Vega warned of infinite extents)."""
    def inline(part):
        part = part.copy(deep=False)  # the caller's chart keeps its frames
        if isinstance(part.data, pd.DataFrame):
            part.data = alt.InlineData(values=to_values(part.data)["values"])
        if isinstance(part, alt.LayerChart):
            part.layer = [inline(layer) for layer in part.layer]
        return part
    return inline(chart).to_dict(validate=False)


ROWS_AUTOSIZE = alt.AutoSizeParams(type="fit-x", contains="padding")  # fit the width; the rows set the height


def _rows_height(n: int) -> int:
    """The plot height of a per-layer chart of n rows: 20 pixels a row for a few layers, down to 12
    for many, room for every name and "N bits" label. Such a chart fits only its width
    (`fit_width`, as the app draws it): title, legend and axis come on top of the rows, instead of out of them (the
    app's default fits the whole chart into this height, which left 3 rows no pixels at all)."""
    return n * max(12, min(20, 420 // max(1, n)))


def fit_width(chart: alt.TopLevelMixin) -> alt.TopLevelMixin:
    """A per-layer chart as the app draws it: only its width fitted to the column, its rows keeping
    their height (a top-level property: compose charts before, as the notebooks do)."""
    return chart.properties(autosize=ROWS_AUTOSIZE)


def _compression(epochs: pd.DataFrame) -> pd.DataFrame:
    """The compression epochs, numbered from 1 as people count, with sizes in KB."""
    df = epochs[epochs["phase"] != "dense"].copy()
    df["epoch_no"] = df["epoch"] + 1
    df["size_kb"] = df["size_bits"] / 8000
    df["file_kb"] = df["file_bytes"] / 1000
    df["target_kb"] = df["target_bits"] / 8000
    df["stage"] = df["phase"].map(PHASES)
    return df


def accuracy_over_epochs(epochs: pd.DataFrame, dense_accuracy: float | None = None) -> alt.LayerChart:
    """Validation accuracy of the deployable model per epoch; the dense model as a reference."""
    df = epochs.assign(epoch_no=epochs["epoch"] + 1, stage=epochs["phase"].map(PHASES))
    line = alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("epoch_no:Q", title="epoch", axis=EPOCH_AXIS),
        y=alt.Y("accuracy:Q", title="validation accuracy", scale=ACCURACY_SCALE, axis=ACCURACY_AXIS),
        color=alt.Color("stage:N", title="phase", legend=LEGEND),
        tooltip=[alt.Tooltip("epoch_no:Q", title="epoch"), alt.Tooltip("stage:N", title="phase"),
                 alt.Tooltip("accuracy:Q", format=".2%")],
    )
    layers = [line]
    if dense_accuracy is not None and dense_accuracy == dense_accuracy:
        ref = pd.DataFrame({"accuracy": [dense_accuracy], "label": ["dense model"]})
        layers.append(alt.Chart(ref).mark_rule(color="gray", strokeDash=[4, 3]).encode(
            y="accuracy:Q", tooltip=[alt.Tooltip("label:N", title=""), alt.Tooltip("accuracy:Q", format=".2%")]))
    return alt.layer(*layers).properties(
        title=alt.Title("Accuracy", subtitle="of the deployable model; dashed: the dense model"),
        width=WIDTH, height=HEIGHT)


def loss_over_steps(steps: pd.DataFrame) -> alt.Chart:
    """Training loss per optimizer step (a running mean over 20 steps), by phase; at most
    LOSS_POINTS of them, so a long run's chart stays small to send and draw."""
    df = steps.assign(smoothed=steps["loss"].rolling(20, min_periods=1).mean(), stage=steps["phase"].map(PHASES))
    df = df[["step", "smoothed", "stage"]].iloc[:: max(1, math.ceil(len(df) / LOSS_POINTS))]
    return alt.Chart(df).mark_line().encode(
        x=alt.X("step:Q", title="optimizer step", axis=alt.Axis(tickMinStep=1, format="d")),
        y=alt.Y("smoothed:Q", title="training loss", scale=alt.Scale(zero=False)),
        color=alt.Color("stage:N", title="phase", legend=LEGEND),
        tooltip=["step:Q", alt.Tooltip("smoothed:Q", format=".4f", title="loss")],
    ).properties(title=alt.Title("Training loss", subtitle="mean of the last 20 steps"), width=WIDTH, height=HEIGHT)


def _amounts(budget_mode: str) -> tuple[float, str]:
    """How a budget mode's amounts are drawn: what one unit of the axis holds, and its name."""
    return AXIS_UNITS[BUDGET_MODES[budget_mode].unit]


def size_over_epochs(epochs: pd.DataFrame, budget_mode: str = "paper") -> alt.LayerChart:
    """Size of the deployable model per epoch in the budget mode's terms (and the .jcz file, where
    those are bytes), against the target (which the slider may move)."""
    scale, unit = _amounts(budget_mode)
    df = _compression(epochs).assign(size=epochs["size_bits"] / scale, target=epochs["target_bits"] / scale)
    names = {"size": "paper size" if budget_mode == "paper" else f"{budget_mode} budget", "target": "target"}
    if unit == "KB":
        names["file_kb"] = ".jcz file"
    long = df.melt(id_vars=["epoch_no"], value_vars=list(names), var_name="what")
    long["what"] = long["what"].map(names)
    return alt.Chart(long).mark_line(point=True).encode(
        x=alt.X("epoch_no:Q", title="epoch", axis=EPOCH_AXIS),
        y=alt.Y("value:Q", title="size (KB)" if unit == "KB" else f"bit-operations ({unit})", scale=alt.Scale(zero=True)),
        color=alt.Color("what:N", title=None, legend=LEGEND),
        strokeDash=alt.condition(alt.datum.what == "target", alt.value([4, 3]), alt.value([1, 0])),
        tooltip=[alt.Tooltip("epoch_no:Q", title="epoch"), alt.Tooltip("what:N", title="size"),
                 alt.Tooltip("value:Q", format=".2f", title=unit)],
    ).properties(title="Size against the target", width=WIDTH, height=HEIGHT)


def tradeoff(curve: pd.DataFrame, epochs: pd.DataFrame | None = None, subset: int | None = None,
             budget_mode: str = "paper") -> alt.LayerChart:
    """Accuracy the current weights would give at sizes around the target (the latest curve
    bold, earlier ones faint), with the run's own point per epoch; sizes in the budget mode's terms."""
    scale, unit = _amounts(budget_mode)
    df = curve.assign(size=curve["size_bits"] / scale, epoch_no=curve["epoch"] + 1)
    axis = f"size (KB, {budget_mode} budget, log scale)" if unit == "KB" else f"bit-operations ({unit}, log scale)"
    latest = df["epoch"].max() if len(df) else 0
    df["curve"] = df["epoch"].map(lambda e: "latest" if e == latest else "earlier epochs")
    lines = alt.Chart(df).mark_line(point=True).encode(
        x=_size_x("size:Q", axis),
        y=alt.Y("accuracy:Q", title="validation accuracy", scale=ACCURACY_SCALE,
                axis=ACCURACY_AXIS),
        detail="epoch_no:O",
        color=alt.Color("curve:N", title=None, scale=alt.Scale(domain=["latest", "earlier epochs"],
                                                                range=["#1f77b4", "#cfd8e3"]),
                        legend=LEGEND if df["epoch"].nunique() > 1 else None),  # one curve (the what-if) needs none
        tooltip=[alt.Tooltip("epoch_no:Q", title="after epoch"), alt.Tooltip("size:Q", format=".2f", title=unit),
                 alt.Tooltip("accuracy:Q", format=".2%")],
    )
    layers = [lines]
    if epochs is not None and len(epochs):
        run = _compression(epochs).assign(size=epochs["size_bits"] / scale)
        layers.append(alt.Chart(run).mark_point(shape="diamond", size=90, filled=True, color="black").encode(
            x="size:Q", y="accuracy:Q",
            tooltip=[alt.Tooltip("epoch_no:Q", title="run, epoch"), alt.Tooltip("accuracy:Q", format=".2%")]))
    where = f" on {subset:,} validation examples spread over the set" if subset else " on the whole validation set"
    return alt.layer(*layers).properties(
        title=alt.Title("Trade-off", subtitle=["accuracy at other sizes, without training", f"scored{where}"]),
        width=WIDTH, height=HEIGHT)


def _log_lines(epochs: pd.DataFrame, names: dict[str, str], y_title: str, title: alt.Title) -> alt.Chart:
    """Some epoch columns (renamed by `names`) as lines over the compression epochs, log scale."""
    df = _compression(epochs).melt(id_vars=["epoch_no"], value_vars=list(names), var_name="what")
    df = df[df["value"] > 0].assign(what=lambda d: d["what"].map(names))
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("epoch_no:Q", title="epoch", axis=EPOCH_AXIS),
        y=alt.Y("value:Q", scale=alt.Scale(type="log"), title=y_title, axis=LOG_AXIS),
        color=alt.Color("what:N", title=None, legend=LEGEND),
        tooltip=[alt.Tooltip("epoch_no:Q", title="epoch"), alt.Tooltip("what:N", title=""),
                 alt.Tooltip("value:Q", format=".3g")],
    ).properties(title=title, width=WIDTH, height=HEIGHT)


def multipliers(epochs: pd.DataFrame, budget_mode: str = "paper") -> alt.Chart:
    """The multipliers of the budget per epoch (log scale), in plain words: the squared error one unit
    of the budget (a bit, or a bit-operation in the bops mode) is worth."""
    priced = PRICED[BUDGET_MODES[budget_mode].unit]
    return _log_lines(epochs, MULTIPLIERS, f"squared error per {priced} (log)",
                      alt.Title("Multipliers", subtitle=f"Lagrange multipliers of the {budget_mode} budget"))


def residuals(epochs: pd.DataFrame) -> alt.Chart:
    """Primal residual sum ||W - V||^2 and dual norm ||U|| per epoch (log scale)."""
    names = {"primal_residual": "primal ‖W − V‖²", "dual_norm": "dual ‖U‖"}
    return _log_lines(epochs, names, "value (log)", alt.Title("Residuals", subtitle="of ADMM, all layers together"))


def _size_x(field: str, title: str) -> alt.X:
    """A log-scale size axis over the sizes shown (not out to the next power of 10), ticks in three
    significant digits (a lone size was labelled 4.0345; ~g wrote 1e+3)."""
    return alt.X(field, title=title, scale=alt.Scale(type="log", nice=False, padding=16), axis=alt.Axis(format=",.3~r"))


def _named(layers: pd.DataFrame) -> pd.DataFrame:
    """Layer rows named for people: the weight's name and what the layer is."""
    label = layers["label"] if "label" in layers else pd.Series("", index=layers.index)
    return layers.assign(layer=layers["name"].where(label.eq(""), layers["name"] + " · " + label.fillna("")))


def layer_bars(layers: pd.DataFrame) -> alt.Chart:
    """Each layer's density now (the latest epoch), coloured by its bitwidth."""
    now = _named(layers[layers["epoch"] == layers["epoch"].max()]).assign(
        text=lambda d: d["bits"].astype(str) + d["bits"].map(lambda b: " bit" if b == 1 else " bits"))
    tooltip = [alt.Tooltip("layer:N", title="layer"), alt.Tooltip("numel:Q", title="weights"),
               alt.Tooltip("nnz:Q", title="kept"), alt.Tooltip("density:Q", format=".3f"), "bits:Q"]
    y = alt.Y("layer:N", sort=None, title=None, axis=alt.Axis(labelLimit=220, labelOverlap=False, labelFontSize=10))
    bars = alt.Chart(now).mark_bar().encode(
        x=alt.X("density:Q", scale=alt.Scale(domain=[0, 1]), title="density (kept fraction)"), y=y,
        color=alt.Color("bits:O", title="bits", scale=alt.Scale(scheme="viridis", domain=list(range(1, 9))),
                        legend=BITS_LEGEND),
        tooltip=tooltip,
    )
    text = alt.Chart(now).mark_text(align="left", dx=3, fontSize=10).encode(
        x="density:Q", y=y, text="text:N", tooltip=tooltip)
    return alt.layer(bars, text).properties(
        title=alt.Title("Layers now", subtitle="kept fraction, coloured by bitwidth"), width=WIDTH,
        height=_rows_height(now["name"].nunique()))


def layer_heatmap(layers: pd.DataFrame, field: str = "density") -> alt.Chart:
    """Density or bitwidth of every layer over the epochs: one row per layer, one column
    per epoch; rows stay legible from 3 layers to 60."""
    df = _named(layers).assign(epoch_no=layers["epoch"] + 1)[["epoch_no", "layer", "density", "bits"]]
    n = max(1, df["layer"].nunique())
    title = {"density": alt.Title("Density over epochs", subtitle="kept fraction of each layer"),
             "bits": alt.Title("Bitwidth over epochs", subtitle="bits of each layer's codebook")}[field]
    scale = alt.Scale(scheme="viridis", domain=[0, 1]) if field == "density" else alt.Scale(scheme="viridis", domain=[1, 8])
    return alt.Chart(df).mark_rect().encode(
        x=alt.X("epoch_no:O", title="epoch", axis=alt.Axis(labelAngle=0)),
        y=alt.Y("layer:N", sort=None, title=None, axis=alt.Axis(labelLimit=220, labelOverlap=False, labelFontSize=10)),
        color=alt.Color(f"{field}:Q", title=field, scale=scale, legend=LAYER_LEGEND),
        tooltip=[alt.Tooltip("epoch_no:Q", title="epoch"), alt.Tooltip("layer:N", title="layer"),
                 alt.Tooltip("density:Q", format=".3f"), "bits:Q"],
    ).properties(title=title, width=WIDTH, height=_rows_height(n))


def live(epochs: pd.DataFrame, layers: pd.DataFrame, steps: pd.DataFrame, curve: pd.DataFrame,
         dense_accuracy: float | None = None, subset: int | None = None,
         budget_mode: str = "paper") -> dict[str, alt.TopLevelMixin]:
    """The charts of a run as it trains (the app's Compress page), by name, from its frames."""
    return {
        "accuracy": accuracy_over_epochs(epochs, dense_accuracy), "size": size_over_epochs(epochs, budget_mode),
        "tradeoff": tradeoff(curve, epochs, subset, budget_mode), "loss": loss_over_steps(steps),
        "multipliers": multipliers(epochs, budget_mode), "residuals": residuals(epochs), "layers": fit_width(layer_bars(layers)),
        "density": fit_width(layer_heatmap(layers, "density")), "bits": fit_width(layer_heatmap(layers, "bits")),
    }


def allocation(layers: pd.DataFrame, title: str = "The allocation at this target") -> alt.Chart:
    """One allocation (one set of layer records, a what-if's or a result's): density and bits per layer."""
    return layer_bars(layers.assign(epoch=0)).properties(
        title=alt.Title(title, subtitle="kept fraction, coloured by bitwidth"))


def sweep(results: pd.DataFrame) -> alt.Chart:
    """Accuracy against size for each method of a sweep."""
    return alt.Chart(results).mark_line(point=True).encode(
        x=_size_x("size_kb:Q", "size (KB, paper accounting, log scale)"),
        y=alt.Y("accuracy:Q", title="validation accuracy", scale=ACCURACY_SCALE, axis=ACCURACY_AXIS),
        color=alt.Color("method:N", title="method"),
        tooltip=["target:N", "method:N", alt.Tooltip("accuracy:Q", format=".4f"), alt.Tooltip("ratio:Q", format=".1f")],
    ).properties(title="Accuracy against size", width=2 * WIDTH, height=280)


def runs(frame: pd.DataFrame) -> alt.Chart:
    """Finished runs side by side: accuracy against paper size, by method."""
    return alt.Chart(frame).mark_point(filled=True, size=80).encode(
        x=_size_x("size_kb:Q", "size (KB, paper accounting, log scale)"),
        y=alt.Y("accuracy:Q", title="validation accuracy", scale=ACCURACY_SCALE, axis=ACCURACY_AXIS),
        color=alt.Color("method:N", title="method"), shape=alt.Shape("model:N", title="model"),
        tooltip=["run:N", "model:N", "data:N", "method:N", "target:N", alt.Tooltip("accuracy:Q", format=".2%"),
                 alt.Tooltip("size_kb:Q", format=".2f", title="KB"), alt.Tooltip("file_bytes:Q", title="file B")],
    ).properties(title="Finished runs: accuracy against size", width=2 * WIDTH, height=HEIGHT)


def report_frame(report: Report) -> pd.DataFrame:
    """Where a .jcz file's bytes go: one row per (part, layer)."""
    rows = [
        {"part": part, "layer": r.name, "bytes": n}
        for r in report.layers
        for part, n in (("codes", r.codes_bytes), ("positions", r.positions_bytes), ("codebook", r.codebook_bytes))
    ]
    rows += [{"part": "other parameters", "layer": "(dense)", "bytes": report.dense_bytes},
             {"part": "header", "layer": "(header)", "bytes": report.header_bytes}]
    return pd.DataFrame(rows)


def bytes_breakdown(report: Report) -> alt.LayerChart:
    """One bar per layer (and for the dense parameters and the header) of a .jcz file's
    bytes, split by part, with each bar's total written at its end."""
    frame = report_frame(report)
    y = alt.Y("layer:N", sort=None, title=None, axis=alt.Axis(labelLimit=260))
    bars = alt.Chart(frame).mark_bar().encode(
        x=alt.X("sum(bytes):Q", stack="zero", title="bytes"), y=y,
        color=alt.Color("part:N", title="part"), tooltip=["layer:N", "part:N", alt.Tooltip("bytes:Q", format=",")],
    )
    totals = alt.Chart(frame).mark_text(align="left", dx=4).encode(
        x=alt.X("sum(bytes):Q"), y=y, text=alt.Text("sum(bytes):Q", format=","))
    return (bars + totals).properties(title=f"Where the {report.file_bytes:,} bytes go", width=2 * WIDTH,
                                      height=alt.Step(28))
