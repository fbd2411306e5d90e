"""Inspect a .jcz checkpoint: where its bytes go, layer by layer; optionally evaluate it."""
from __future__ import annotations

import tempfile
from pathlib import Path

import streamlit as st

from jointcomp import CheckpointError, charts, inspect, load_compressed, load_dataset
from jointcomp.data import available
from jointcomp.trainer import accuracy

st.set_page_config(page_title="jointcomp · inspect", layout="wide")
st.title("Inspect a compressed checkpoint")

upload = st.file_uploader("A .jcz file", type=["jcz"], key="upload")
if upload is None:
    st.info("Upload a .jcz file, for example the one the quick-start page lets you download.")
    st.stop()

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.jcz"
    path.write_bytes(upload.getvalue())
    try:
        report = inspect(path)
        model = load_compressed(path)
    except CheckpointError as err:
        st.error(f"This file cannot be opened: {str(err).replace(str(path), upload.name)}")
        st.stop()

cols = st.columns(4)
cols[0].metric("File size", f"{report.file_bytes:,} B")
cols[1].metric("Dense fp32 size", f"{report.fp32_bytes:,} B")
cols[2].metric("Ratio on file bytes", f"{report.file_ratio:.1f}x")
cols[3].metric("Paper-accounting ratio", f"{report.paper_ratio:.1f}x", help="32 x weights / sum of bits x non-zeros")
st.altair_chart(charts.bytes_breakdown(report))
st.dataframe([{"layer": r.name, "shape": "x".join(map(str, r.shape)), "non-zeros": r.nnz, "bits": r.bits,
               "codes B": r.codes_bytes, "positions B": r.positions_bytes, "positions encoding": r.positions_encoding,
               "codebook B": r.codebook_bytes} for r in report.layers], hide_index=True)

spec = report.model or {}
choices = available()
default = choices.index(spec.get("data")) if spec.get("data") in choices else 0
data_name = st.selectbox("Evaluate on", choices, index=default, key="eval_data")
if st.button("Evaluate", key="evaluate"):
    try:
        st.metric("Validation accuracy", f"{accuracy(model, load_dataset(data_name)):.2%}")
    except RuntimeError:
        st.error(f"This model does not take {data_name} inputs; pick the data set it was trained on.")
