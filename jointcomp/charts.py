"""Altair charts of a run's records, shared by the app and the notebooks.

Each builder takes the tidy frames of records.py (or a codec Report) and returns a chart.
"""
from __future__ import annotations

import altair as alt
import pandas as pd

from .codec import Report

WIDTH = 320


def _admm(epochs: pd.DataFrame) -> pd.DataFrame:
    df = epochs[epochs["phase"] != "dense"].copy()
    df["size_kb"] = df["size_bits"] / 8000
    df["target_kb"] = df["target_bits"] / 8000
    return df


def accuracy_vs_size(epochs: pd.DataFrame, target_bits: float | None = None) -> alt.Chart:
    """Accuracy of the deployable model against its size, epoch by epoch; the target as a rule."""
    df = _admm(epochs)
    base = alt.Chart(df).encode(
        x=alt.X("size_kb:Q", title="size (KB)", scale=alt.Scale(zero=False)),
        y=alt.Y("accuracy:Q", title="validation accuracy", scale=alt.Scale(zero=False)),
    )
    line = base.mark_line(point=True).encode(
        order="epoch:Q",
        color=alt.Color("phase:N", title="phase"),
        tooltip=["epoch:Q", "phase:N", alt.Tooltip("accuracy:Q", format=".4f"), alt.Tooltip("size_kb:Q", format=".2f"),
                 alt.Tooltip("ratio:Q", format=".1f")],
    )
    layers = [line]
    if target_bits is not None:
        rule = alt.Chart(pd.DataFrame({"target_kb": [target_bits / 8000]})).mark_rule(color="red", strokeDash=[4, 3])
        layers.append(rule.encode(x="target_kb:Q", tooltip=[alt.Tooltip("target_kb:Q", title="target KB", format=".2f")]))
    return alt.layer(*layers).properties(title="Accuracy against size", width=WIDTH, height=240)


def multipliers(epochs: pd.DataFrame) -> alt.Chart:
    """The Lagrange multipliers of the size constraint, per epoch (log scale)."""
    df = _admm(epochs).melt(id_vars=["epoch"], value_vars=["lambda_prune", "lambda_quant"], var_name="multiplier")
    df = df[df["value"] > 0]
    return alt.Chart(df).mark_line(point=True).encode(
        x=alt.X("epoch:Q"), y=alt.Y("value:Q", scale=alt.Scale(type="log"), title="multiplier"),
        color="multiplier:N", tooltip=["epoch:Q", "multiplier:N", alt.Tooltip("value:Q", format=".3g")],
    ).properties(title="Lagrange multipliers (λ)", width=WIDTH, height=240)


def residuals(layers: pd.DataFrame) -> alt.Chart:
    """Per-layer dual norm ||U|| and primal residual ||W - V||^2 per epoch (log scale)."""
    df = layers.melt(id_vars=["epoch", "name"], value_vars=["dual_norm", "residual"], var_name="quantity")
    df = df[df["value"] > 0]
    return alt.Chart(df).mark_line(point=True).encode(
        x="epoch:Q", y=alt.Y("value:Q", scale=alt.Scale(type="log"), title=None),
        color=alt.Color("name:N", title="layer"), strokeDash=alt.StrokeDash("quantity:N"),
        tooltip=["epoch:Q", "name:N", "quantity:N", alt.Tooltip("value:Q", format=".3g")],
    ).properties(title="Dual norms ‖U‖ and residuals ‖W−V‖²", width=WIDTH, height=240)


def layer_bars(layers: pd.DataFrame) -> alt.Chart:
    """Each layer's density and bitwidth now (the latest epoch)."""
    now = layers[layers["epoch"] == layers["epoch"].max()]
    tooltip = ["name:N", "numel:Q", "nnz:Q", alt.Tooltip("density:Q", format=".3f"), "bits:Q"]
    density = alt.Chart(now).mark_bar().encode(
        x=alt.X("density:Q", scale=alt.Scale(domain=[0, 1]), title="density (kept fraction)"),
        y=alt.Y("name:N", sort=None, title="layer"), tooltip=tooltip,
    ).properties(width=WIDTH / 2, height=max(80, 24 * now["name"].nunique()), title="Density now")
    bits = alt.Chart(now).mark_bar(color="#e45756").encode(
        x=alt.X("bits:Q", scale=alt.Scale(domain=[0, 8]), title="bits"),
        y=alt.Y("name:N", sort=None, title=None, axis=alt.Axis(labels=False)), tooltip=tooltip,
    ).properties(width=WIDTH / 2, height=max(80, 24 * now["name"].nunique()), title="Bitwidth now")
    return alt.hconcat(density, bits)


def layer_heatmap(layers: pd.DataFrame, field: str = "density") -> alt.Chart:
    """Density or bitwidth of every layer over the epochs."""
    return alt.Chart(layers).mark_rect().encode(
        x="epoch:O", y=alt.Y("name:N", sort=None, title="layer"), color=alt.Color(f"{field}:Q", title=field),
        tooltip=["epoch:Q", "name:N", alt.Tooltip("density:Q", format=".3f"), "bits:Q"],
    ).properties(title=f"{field.capitalize()} over epochs", width=WIDTH, height=max(80, 24 * layers["name"].nunique()))


def allocation(layers: pd.DataFrame) -> alt.Chart:
    """A what-if allocation (one set of layer records): density and bits per layer."""
    return layer_bars(layers.assign(epoch=0))


def sweep(results: pd.DataFrame) -> alt.Chart:
    """Accuracy against size for each method of a sweep."""
    return alt.Chart(results).mark_line(point=True).encode(
        x=alt.X("size_kb:Q", title="size (KB)", scale=alt.Scale(type="log")),
        y=alt.Y("accuracy:Q", scale=alt.Scale(zero=False)), color="method:N",
        tooltip=["target:N", "method:N", alt.Tooltip("accuracy:Q", format=".4f"), alt.Tooltip("ratio:Q", format=".1f")],
    ).properties(title="Accuracy against size", width=2 * WIDTH, height=280)


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


def bytes_breakdown(report: Report) -> alt.Chart:
    """Stacked bars of a .jcz file's bytes by layer and part."""
    return alt.Chart(report_frame(report)).mark_bar().encode(
        x=alt.X("bytes:Q", stack="zero"), y=alt.Y("layer:N", sort=None), color="part:N",
        tooltip=["layer:N", "part:N", "bytes:Q"],
    ).properties(title=f"Where the {report.file_bytes:,} bytes go", width=2 * WIDTH, height=200)
