"""Runs: every run folder of this server, running or not; reopen a running one, compare the
finished ones, download any run's file."""
from __future__ import annotations

import streamlit as st

import ui
from jointcomp.app import charts
from jointcomp.app.runner import active_runner, list_runs, run_file, runs_root

st.set_page_config(page_title="jointcomp · runs", layout="wide")
ui.page_menu()
st.title("Runs")
st.caption(f"Every run the app started, from its folder under `{runs_root()}`. A run keeps training when its "
           "tab is closed: open it again from here.")

runs = list_runs()
if runs.empty:
    st.info("No runs yet: start one on the main page.")
    st.stop()

st.table(runs.drop(columns=["path"]).style.format(
    {"accuracy": "{:.2%}", "dense_accuracy": "{:.2%}", "size_kb": "{:.2f}", "ratio": "{:.1f}x",
     "file_bytes": "{:,.0f}", "epochs": "{:.0f}"}, na_rep="–"))

running = runs[runs["status"] == "running"]
for row in running.itertuples():
    if st.button(f"Open the running run {row.run} ({row.model} on {row.data}, target {row.target})",
                 key=f"open_{row.run}"):
        st.session_state.runner = active_runner(row.path)
        st.session_state.runner_key = None  # opened by hand: shown whatever the sidebar holds
        st.switch_page("pages/0_Compress.py")

done = runs[runs["status"].isin(["finished", "stopped"])]
if not done.empty:
    st.altair_chart(charts.runs(done))
    choice = st.selectbox("Download the file of", list(done["run"]), key="download_run")
    path = done.set_index("run").loc[choice, "path"]
    st.download_button("Download .jcz", run_file(path), file_name=f"{choice}.jcz",
                       mime="application/octet-stream", key="download_file")
