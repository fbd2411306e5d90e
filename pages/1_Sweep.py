"""Sweep: several targets one after another -> accuracy against size, jointcomp beside a baseline."""
from __future__ import annotations

import streamlit as st

import ui
from jointcomp.app import charts
from jointcomp.methods import METHODS
from jointcomp.app.runner import Sweep

st.set_page_config(page_title="jointcomp · sweep", layout="wide")
ui.page_menu()
st.title("Sweep: accuracy against size")
st.caption("Runs each target with jointcomp (admm) and the chosen baselines, same data, epochs and schedule.")

choices = ui.sidebar(with_method=False)
model, data, _ = ui.start_or_stop(choices)
dense_accuracy = ui.whole_set_accuracy(choices)

targets = st.multiselect("Targets", [f"{r}x" for r in ui.RATIOS], default=["20x", "50x", "100x", "200x"], key="targets")
methods = st.multiselect("Methods", list(METHODS), default=["admm", "posttrain", "uniform"], key="methods")
sweep: Sweep | None = st.session_state.get("sweep")
running = sweep is not None and sweep.running

go, stop = st.columns([1, 5])
if go.button("Run sweep", type="primary", disabled=running or not targets or not methods, key="run_sweep"):
    calibrates = any(choices.config.with_method(m).calibrates for m in methods)
    calibration = ui.whatif_preview(choices).compressor if calibrates else None  # measured once per server
    st.session_state.sweep = Sweep.compress(model, data, choices.config, choices.model, targets, methods, dense_accuracy,
                                            calibration)
    st.session_state.sweep_label = f"{choices.model} on {choices.data} (dense {dense_accuracy:.2%})"
    st.rerun()
if stop.button("Stop", disabled=not running, key="stop_sweep"):
    sweep.stop()
    st.rerun()


@st.fragment(run_every=1.0 if running else None)
def results() -> None:
    s: Sweep | None = st.session_state.get("sweep")
    if s is None:
        return
    done = len(s.results)
    st.progress(done / len(s.jobs), text=f"{st.session_state.sweep_label}: {done} of {len(s.jobs)} runs done")
    if s.error:
        st.error(f"The sweep failed: {s.error}")
    frame = s.frame()
    if not frame.empty:
        st.altair_chart(charts.sweep(frame))
        st.dataframe(frame, hide_index=True, height="content")  # every run: a default sweep is 12
    if running and not s.running:
        st.rerun(scope="app")


scored = len(data.val_y)
st.caption(f"Starting model: {choices.model} on {choices.data}, dense accuracy {dense_accuracy:.2%}. Every accuracy is on "
           f"the {scored:,} validation images: one image is {100 / scored:.2g} points, so runs that differ by a few "
           "images are level. A sweep's results stay until the next sweep, whatever is picked after it: each names what "
           "it ran on.")
results()
