"""jointcomp quick start: pick a network and a target size, watch it compress, download it.

    streamlit run app.py
"""
from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

import ui
from jointcomp import Compressor, charts
from jointcomp.budget import format_bits
from jointcomp.runner import Runner, new_run_dir, what_if

st.set_page_config(page_title="jointcomp", page_icon="🗜️", layout="wide")
st.title("jointcomp: compress a network to a size budget")
st.caption("Give only the target size: one training run learns which weights to keep and how many bits "
           "each layer gets (ADMM with knapsack projections, Yang et al., CVPR 2020).")

choices = ui.sidebar()
try:
    model, data, dense_accuracy = ui.dense_model(choices.model, choices.data, choices.dense_epochs, choices.config.seed)
except (ValueError, FileNotFoundError) as err:
    st.error(str(err))
    st.stop()

key = (choices.model, choices.data, choices.dense_epochs, choices.config.seed, choices.config.budget_mode)
if st.session_state.get("preview_key") != key:  # a per-session compressor, on its own copy, for what-ifs
    st.session_state.preview = what_if(model, data, choices.config, choices.model)
    st.session_state.preview_key = key
preview: Compressor = st.session_state.preview

ratio = ui.target_slider(preview.dense_bits)
target = f"{ratio}x"
runner: Runner | None = st.session_state.get("runner")
running = runner is not None and runner.running

if running and abs(runner.target_bits - preview.dense_bits / ratio) > 1e-6 * preview.dense_bits:
    runner.set_target(target)  # the running compression follows the slider at its next projection
    st.toast(f"Target of the running compression moved to {target}")

start_col, stop_col, status_col = st.columns([1, 1, 4])
if start_col.button("Start", type="primary", disabled=running, key="start"):
    config = dataclasses.replace(choices.config, target=target)
    st.session_state.runner = Runner.compress(model, data, config, choices.model, run_dir=new_run_dir())
    st.rerun()
if stop_col.button("Stop", disabled=not running, key="stop"):
    runner.stop(wait=2.0)
    st.rerun()
status_col.markdown(
    f"**{choices.model}** on **{choices.data}** · dense accuracy {dense_accuracy:.2%} · "
    f"fp32 weights {format_bits(preview.dense_bits)} · target **{target}** = {format_bits(preview.dense_bits / ratio)}"
)

if not running:
    with st.expander("What-if: the allocation the method would start from at this target (no training)",
                     expanded=runner is None):
        plan = preview.plan(target)
        layers = [vars(layer) for layer in plan.layers]
        c1, c2, c3 = st.columns(3)
        c1.metric("Size (paper accounting)", format_bits(plan.size_bits), f"{plan.ratio:.1f}x smaller", delta_color="off")
        c2.metric("Accuracy if deployed untrained", f"{plan.accuracy:.2%}", f"{plan.accuracy - plan.dense_accuracy:+.2%}")
        c3.metric(".jcz file", f"{plan.file_bytes:,} B", f"{plan.file_ratio:.1f}x smaller", delta_color="off")
        st.altair_chart(charts.allocation(pd.DataFrame(layers)))


@st.fragment(run_every=1.0 if running else None)
def live() -> None:
    """Progress and live charts, redrawn every second while a run is active."""
    r: Runner | None = st.session_state.get("runner")
    if r is None:
        return
    p = r.progress()
    eta = f", about {p.eta:.0f} s left" if p.eta else ""
    st.progress(p.fraction, text=f"{p.fraction:.0%} · {p.elapsed:.0f} s elapsed{eta}")
    if r.error:
        st.error(f"The run failed: {r.error}")
    phase = {"admm": "ADMM: learning which weights to keep and how many bits each layer gets",
             "finetune": "final phase: training the network in exactly the shape that ships (codebooks only)",
             "dense": "dense pre-training"}.get(p.phase, "")
    st.caption(f"compression epoch {p.epoch} of {p.total_epochs} · target {format_bits(r.target_bits)}"
               + (f" · {phase}" if phase else ""))
    for note in p.notes:
        st.info(note)
    epochs, layers = r.epochs(), r.layers()
    if p.epoch:
        a, b, c = st.columns(3)
        a.altair_chart(charts.accuracy_vs_size(epochs, r.target_bits))
        b.altair_chart(charts.multipliers(epochs))
        c.altair_chart(charts.residuals(layers))
        d, e = st.columns([1, 1])
        d.altair_chart(charts.layer_bars(layers))
        e.altair_chart(charts.layer_heatmap(layers, "density"))
    elif r.running:
        st.info("Compression starts after the first projection; charts appear after its first epoch.")
    if running and not r.running:
        st.rerun(scope="app")  # the run just ended: show the results


live()

if runner is not None and not running and runner.final is not None:
    final = runner.final
    st.subheader("Result" + (" (stopped early)" if final.stopped else ""))
    cols = st.columns(5)
    cols[0].metric("Accuracy (compressed)", f"{final.accuracy:.2%}", f"{final.accuracy - final.dense_accuracy:+.2%}")
    cols[1].metric("Accuracy (dense)", f"{final.dense_accuracy:.2%}")
    cols[2].metric("Paper size (bits × non-zeros)", format_bits(final.size_bits), f"{final.ratio:.1f}x", delta_color="off")
    cols[3].metric(".jcz file size", f"{final.file_bytes:,} B", f"{final.file_ratio:.1f}x vs fp32 file", delta_color="off")
    cols[4].metric("Target", format_bits(final.target_bits))
    st.dataframe([{"layer": l.name, "weights": l.numel, "kept": l.nnz, "density": round(l.density, 4), "bits": l.bits}
                  for l in final.layers], hide_index=True)
    st.download_button("Download compressed checkpoint (.jcz)", runner.checkpoint(),
                       file_name=f"{choices.model}-{choices.data}-{final.ratio:.0f}x.jcz",
                       mime="application/octet-stream", key="download")
