"""Compress (the main page): pick a network and a target size, watch it compress, download it."""
from __future__ import annotations

import dataclasses

import pandas as pd
import streamlit as st

import ui
from jointcomp.app import charts
from jointcomp.bops import format_bops
from jointcomp.budget_modes import format_amount
from jointcomp.app.runner import SKETCH_EXAMPLES, Runner, WhatIfs, new_run_dir
from jointcomp.trainer import TRADEOFF_SUBSET

CHART_SECONDS = 3.0  # the live charts' redraw interval; the progress line redraws every second

st.set_page_config(page_title="jointcomp", page_icon="🗜️", layout="wide")
ui.page_menu()
st.title("jointcomp: compress a network to a size budget")
st.caption("Give only the target size. Without training, a few hundred calibration inputs decide which weights "
           "to keep and how many bits each layer gets (the slider shows it at once); one training run learns them "
           "(ADMM with knapsack projections, Yang et al., CVPR 2020).")

choices = ui.sidebar()
model, data, _ = ui.start_or_stop(choices)
preview: WhatIfs = ui.whatif_preview(choices)

key = (choices.model, choices.data, choices.dense_epochs, choices.config.seed, choices.config.budget_mode,
       choices.checkpoint)
if st.session_state.get("preview_key") != key:
    st.session_state.preview_key = key
    st.session_state.whatif_plans = {}  # the what-ifs this session looked at, by target
dense_bits = preview.compressor.dense_bits

mode = choices.config.budget_mode
ratio = ui.target_slider(dense_bits, mode)
target = f"{ratio}x"


def shown_runner() -> Runner | None:
    """The session's run where it is of the network, data and start chosen now, still running, or
    opened from the Runs page (no choices recorded): a finished run of other choices is not shown
    (nor downloaded) under this one's header; the Runs page keeps it."""
    r: Runner | None = st.session_state.get("runner")
    ran_with = st.session_state.get("runner_key")
    return r if r is not None and (r.running or ran_with is None or ran_with == key) else None


runner = shown_runner()
running = runner is not None and runner.running

if running and abs(runner.target_bits - dense_bits / ratio) > 1e-6 * dense_bits:
    runner.set_target(target)  # the running compression follows the slider at its next projection
    st.toast(f"Target of the running compression moved to {target}")

start_col, posttrain_col, stop_col, status_col = st.columns([1, 2, 1, 4])
start = start_col.button("Start", type="primary", disabled=running, key="start",
                         help=f"train with method {choices.config.method}, {choices.config.epochs} epochs")
without_training = posttrain_col.button("Compress without training", disabled=running, key="posttrain",
                                        help="method posttrain: the what-if's result below, as a run you can download")
if start or without_training:
    config = dataclasses.replace(choices.config.with_method("posttrain") if without_training else choices.config, target=target)
    st.session_state.runner = Runner.compress(model, data, config, choices.model, run_dir=new_run_dir(),
                                              dense_accuracy=ui.whole_set_accuracy(choices),
                                              calibration=preview.compressor)
    st.session_state.runner_key, st.session_state.runner_label = key, f"{choices.model} on {choices.data} at {target}"
    st.rerun()
if stop_col.button("Stop", disabled=not running or not runner.stoppable, key="stop",
                   help="a run without training cannot be stopped: it ends on its own"
                   if running and not runner.stoppable else None):
    runner.stop(wait=2.0)
    st.rerun()
status_col.markdown(
    f"**{choices.model}** on **{choices.data}** · dense accuracy {preview.dense_accuracy:.2%}"
    f"{f' (on the {SKETCH_EXAMPLES:,} validation images of the what-if)' if preview.sketches else ''} · "
    f"dense {format_amount(dense_bits, mode)} · target **{target}** = {format_amount(dense_bits / ratio, mode)}"
)

SIZES = ("**Size** is what the budget counts (Advanced → Budget counts): by default bits × non-zeros of the "
         "compressed weights, the measure of the paper; in the bops mode bit-operations of one forward pass. "
         "The **.jcz file** also stores where the non-zeros are, the codebooks, biases and a header: "
         "the Inspect page shows where every byte goes.")

if runner is None and st.session_state.get("runner") is not None:
    st.caption(f"Your last run ({st.session_state.runner_label}) is on the Runs page.")
if not running:
    with st.expander("What-if: this target without training", expanded=runner is None):
        if preview.sketches:
            st.caption(f"A sketch of compression without training (method posttrain) from {preview.calibrated_on} training "
                       "inputs, drawn at once: each layer's options priced by what they do to its outputs, one knapsack "
                       "for the target, each layer's kept weights reconstructed on its own dense inputs. Accuracy on "
                       f"{SKETCH_EXAMPLES:,} validation images spread over the set (the dense network: {preview.dense_accuracy:.2%} on "
                       "them). *Compress without training* gives the full result: three allocations compared, the "
                       "layers reconstructed in order, the whole validation set (a run of its own, on this "
                       "calibration: on a network this large, a minute or two on a CPU).")
        else:
            st.caption(f"Compressed without training (method posttrain) from {preview.calibrated_on} training inputs: each "
                       "layer's options priced by what they do to its outputs, one knapsack for the target, the kept "
                       "weights reconstructed layer by layer. This is what *Compress without training* gives you; a "
                       "training run gains most at high ratios, and at low ones can end below it (the digits MLP at 50x: "
                       "BENCHMARKS.md). Accuracy on the whole validation set.")
        plans = st.session_state.whatif_plans
        if target not in plans:
            with st.spinner(f"compressing to {target} without training…"):
                plans[target] = preview.plan(target)
        plan = plans[target]
        layers = [vars(layer) for layer in plan.layers]
        c1, c2, c3 = st.columns(3)
        c1.metric(f"Size ({mode} budget)", format_amount(plan.size_bits, mode), f"{plan.ratio:.1f}x smaller", delta_color="off")
        c2.metric("Accuracy without training" + (" (sketch)" if preview.sketches else ""), f"{plan.accuracy:.2%}", f"{plan.accuracy - plan.dense_accuracy:+.2%}")
        c3.metric(".jcz file", f"{plan.file_bytes:,} B", f"{plan.file_ratio:.1f}x smaller", delta_color="off")
        st.caption(SIZES + " Ratios below 4x ask for more than 8 bits per weight: every layer keeps all "
                   "its weights at 8 bits, the most a codebook offers.")
        left, right = st.columns(2)
        left.container(key="whatif_allocation").altair_chart(charts.fit_width(charts.allocation(pd.DataFrame(layers))))
        curve = pd.DataFrame([{"epoch": -1, "size_bits": size, "accuracy": score} for size, score in
                              [(dense_bits, preview.dense_accuracy), *((p.size_bits, p.accuracy) for p in plans.values())]])
        right.container(key="whatif_tradeoff").altair_chart(
            charts.tradeoff(curve, subset=SKETCH_EXAMPLES if preview.sketches else None, budget_mode=mode))
        right.caption("The dense network and every target looked at so far: each new target adds its point.")


CAPTIONS = {
    "size": SIZES,
    "tradeoff": "Each curve: the accuracy the weights of that epoch would give at other sizes if projected there "
                "without training (a curve is drawn while curves take at most a tenth of the run's time); "
                "the diamonds are the run itself, every epoch.",
    "multipliers": "Each multiplier is the price of one bit of budget in squared weight error, at the last "
                   "projection: the pruning one is the score of the last weight kept, the joint one what one more "
                   "bit would buy. A tighter target raises both.",
    "residuals": "ADMM converges when W and its projection V agree: the primal residual falls towards zero while "
                 "the dual norm levels off.",
}


def live_charts(r: Runner, epochs_done: int) -> dict[str, dict]:
    """The live charts as Vega-Lite specs, built once per finished epoch (not every redraw)."""
    key = (id(r), epochs_done, r.final is not None)
    if st.session_state.get("chart_key") != key:
        now = charts.live(r.epochs(), r.layers(), r.steps(), r.curve(), r.dense_accuracy, TRADEOFF_SUBSET,
                          r.engine.config.budget_mode)
        st.session_state.chart_specs = {name: charts.vega_lite(chart) for name, chart in now.items()}
        st.session_state.chart_key = key
    return st.session_state.chart_specs


@st.fragment(run_every=1.0 if running else None)
def progress() -> None:
    """The progress line, its phase and notes, redrawn every second while a run is active."""
    r = shown_runner()
    if r is None:
        return
    p = r.progress()
    st.progress(p.fraction, text=f"{p.fraction:.0%} · {p.describe()}")
    if r.error:
        st.error(f"The run failed: {r.error}")
    phase = {"admm": "ADMM: learning which weights to keep and how many bits each layer gets",
             "prune": "pruning: a baseline's masks held while the network trains; bitwidths come next",
             "retrain": "retraining: masks and bitwidths fixed, the kept weights trained through their quantization",
             "finetune": "final phase: training the network in exactly the shape that ships (codebooks only)",
             "dense": "dense pre-training"}.get(p.phase, "")
    st.caption(f"target {format_amount(r.target_bits, r.engine.config.budget_mode)}" + (f" · {phase}" if phase else ""))
    for note in p.notes:
        st.info(note)
    if not p.epoch and r.running:
        st.info("Compressing without training: calibration, then each layer in turn; it ends on its own." if p.total_epochs == 0 else
                "The first charts appear after the first compression epoch.")
    if running and not r.running:
        st.rerun(scope="app")  # the run just ended: show the results


@st.fragment(run_every=CHART_SECONDS if running else None)
def live() -> None:
    """The live charts, redrawn every CHART_SECONDS while a run is active: building and sending
    them runs on the server beside the training thread, so they are drawn less often than the
    progress line (bench/app_latency.py measures what they cost the run)."""
    r = shown_runner()
    if r is None:
        return
    p = r.progress()
    if p.epoch:
        specs = live_charts(r, p.epoch)
        for row in (("accuracy", "size", "tradeoff"), ("loss", "multipliers", "residuals"),
                    ("layers", "density", "bits")):
            for column, name in zip(st.columns(3), row):
                box = column.container(key=f"chart_{name}")  # a stable handle for tests and styling
                box.vega_lite_chart(spec=specs[name])
                if name in CAPTIONS:
                    box.caption(CAPTIONS[name])


progress()
live()

if runner is not None and not running and runner.final is not None:
    final = runner.final
    p = runner.progress()
    st.subheader("Result" + (f" ({p.describe()})" if final.stopped else ""))
    ran = runner.engine.config.budget_mode
    cols = st.columns(3)
    cols[0].metric("Accuracy (compressed)", f"{final.accuracy:.2%}", f"{final.accuracy - final.dense_accuracy:+.2%}")
    cols[1].metric("Accuracy (dense)", f"{final.dense_accuracy:.2%}")
    cols[2].metric("Target", format_amount(final.target_bits, ran))
    cols = st.columns(3)
    cols[0].metric(f"Size ({ran} budget)", format_amount(final.size_bits, ran), f"{final.ratio:.1f}x", delta_color="off")
    cols[1].metric(".jcz file size", f"{final.file_bytes:,} B", f"{final.file_ratio:.1f}x vs fp32 file", delta_color="off")
    cols[2].metric("Bit-operations", format_bops(final.bops), f"{final.bops_ratio:.0f}x fewer than dense", delta_color="off",
                   help="multiply-accumulates of one input x weight bits x 8-bit activations; dense: 32 x 32 bits")
    table, chart = st.columns(2)
    table.dataframe([{"layer": l.name, "what": l.label, "weights": l.numel, "kept": l.nnz,
                      "density": round(l.density, 4), "bits": l.bits} for l in final.layers], hide_index=True)
    chart.container(key="result_allocation").altair_chart(
        charts.fit_width(charts.allocation(pd.DataFrame([vars(l) for l in final.layers]), "The allocation that ships")))
    ran_on = runner.engine.compressor.meta
    st.download_button("Download compressed checkpoint (.jcz)", runner.checkpoint(),
                       file_name=f"{ran_on.get('model', 'model')}-{ran_on.get('data', 'data')}-{final.ratio:.0f}x.jcz",
                       mime="application/octet-stream", key="download")
