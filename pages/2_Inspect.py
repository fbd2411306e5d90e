"""Inspect a .jcz checkpoint: where its bytes go, layer by layer; optionally evaluate it."""
from __future__ import annotations

import io
import tempfile
import zipfile
from pathlib import Path

import streamlit as st

import ui
from jointcomp import CheckpointError, inspect_file, load_compressed, load_dataset
from jointcomp.app import charts
from jointcomp.data import available
from jointcomp.deploy.c import flash_report
from jointcomp.trainer import accuracy

st.set_page_config(page_title="jointcomp · inspect", layout="wide")
ui.page_menu()
st.title("Inspect a compressed checkpoint")

upload = st.file_uploader("A .jcz file", type=["jcz"], key="upload")
if upload is None:
    st.info("Upload a .jcz file, for example the one the Compress page lets you download.")
    st.stop()

with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "model.jcz"
    path.write_bytes(upload.getvalue())
    try:
        report = inspect_file(path)
        model = load_compressed(path)
    except CheckpointError as err:
        st.error(f"This file cannot be opened: {str(err).replace(str(path), upload.name)}")
        st.stop()
    try:
        c_export, c_problem = flash_report(path), ""
    except (ValueError, CheckpointError) as err:
        c_export, c_problem = None, str(err).replace(str(path), upload.name)

cols = st.columns(4)
cols[0].metric("File size", f"{report.file_bytes:,} B")
cols[1].metric("Dense fp32 size", f"{report.fp32_bytes:,} B")
cols[2].metric("Ratio on file bytes", f"{report.file_ratio:.1f}x")
cols[3].metric("Paper-accounting ratio", f"{report.paper_ratio:.1f}x", help="32 x weights / sum of bits x non-zeros")
if c_export is not None:
    cols = st.columns(4)
    cols[0].metric("C export: flash", f"{c_export.flash_bytes:,} B",
                   help="const data of model.c: packed codes, positions, codebooks, biases (python -m jointcomp export-c)")
    cols[1].metric("C export: RAM", f"{c_export.ram_bytes:,} B", help="the activation arena of jc_predict")
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("model.c", c_export.source)
        z.writestr("model.h", c_export.header)
    cols[2].download_button("Download C (model.c, model.h)", archive.getvalue(),
                            file_name=Path(upload.name).stem + "_c.zip", key="download_c")
else:
    st.caption(f"No C export for this file: {c_problem}")
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
