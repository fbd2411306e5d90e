"""The charts' specs for small and large networks: one legible row per layer, epochs
labelled as the records number them (from 1), every chart a single view Streamlit can fit."""
import pandas as pd
import pytest

from jointcomp.app import charts


def layer_history(n_layers: int, first_epoch: int, n_epochs: int) -> pd.DataFrame:
    rows = [{"epoch": e, "name": f"block{j}.conv.weight", "numel": 100, "nnz": 50, "density": 0.5,
             "bits": 1 + (j + e) % 8, "residual": 0.1, "dual_norm": 0.2, "label": "Conv2d 4→5, 5x5"}
            for e in range(first_epoch, first_epoch + n_epochs) for j in range(n_layers)]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_layers", [3, 60])
@pytest.mark.parametrize("field", ["density", "bits"])
def test_heatmap_has_one_legible_row_per_layer(n_layers, field):
    history = layer_history(n_layers, first_epoch=10, n_epochs=5)  # epochs after 10 of dense training
    spec = charts.fit_width(charts.layer_heatmap(history, field)).to_dict()
    assert spec["height"] >= 12 * n_layers and spec["autosize"]["type"] == "fit-x"  # title, legend, axis come on top
    assert spec["encoding"]["y"]["field"] == "layer" and spec["encoding"]["y"]["type"] == "nominal"
    data = pd.DataFrame(next(iter(spec["datasets"].values())))
    assert data["layer"].nunique() == n_layers
    assert data["layer"].iloc[0] == "block0.conv.weight · Conv2d 4→5, 5x5"  # named for people
    assert sorted(data["epoch_no"].unique()) == [11, 12, 13, 14, 15]  # what the records say, counted from 1
    assert spec["encoding"]["x"]["field"] == "epoch_no"


@pytest.mark.parametrize("n_layers", [3, 60])
def test_layer_bars_single_view(n_layers):
    spec = charts.fit_width(charts.layer_bars(layer_history(n_layers, 0, 2))).to_dict()
    assert "hconcat" not in spec and "vconcat" not in spec  # Streamlit can only fit single views
    assert spec["height"] >= 12 * n_layers and spec["autosize"]["type"] == "fit-x"


def test_the_runs_list_shows_the_target_a_run_ended_at(tmp_path):
    import json

    from jointcomp.app.runner import list_runs

    dense_bits = 32 * 1000.0
    for name, target, ended in (("a-kept", "50x", dense_bits / 50), ("b-moved", "50x", dense_bits / 200)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"model": "mlp", "data": "digits",
                                                        "compress": {"target": target, "method": "admm"}}))
        size = ended * 0.99
        (folder / "summary.json").write_text(json.dumps({"target_bits": ended, "size_bits": size,
                                                         "ratio": dense_bits / size, "stopped": False}))
    runs = list_runs(tmp_path).set_index("run")
    assert runs.loc["a-kept", "target"] == "50x"
    assert runs.loc["b-moved", "target"] == "200x (moved from 50x)"


def test_per_layer_legends_sit_above_the_rows_so_a_short_chart_shows_them_whole():
    """A legend beside a 3-layer chart (8 bitwidths, or a colour gradient) is taller than the
    chart itself and ran past its bottom edge in the what-if's expander."""
    history = layer_history(3, 0, 2)
    for chart in (charts.layer_bars(history), charts.allocation(history[history["epoch"] == 0]),
                  charts.layer_heatmap(history, "density"), charts.layer_heatmap(history, "bits")):
        spec = chart.to_dict()
        colours = [view["encoding"]["color"] for view in spec.get("layer", [spec]) if "color" in view.get("encoding", {})]
        assert colours and all(c["legend"]["orient"] == "top" for c in colours)


def dataset_refs(spec) -> list[str]:
    """The names of the datasets a Vega-Lite dict's views draw from."""
    if isinstance(spec, dict):
        data = spec.get("data")
        own = [data["name"]] if isinstance(data, dict) and "name" in data else []
        return own + [name for key, value in spec.items() if key != "datasets" for name in dataset_refs(value)]
    return [name for value in spec for name in dataset_refs(value)] if isinstance(spec, list) else []


def test_a_live_chart_keeps_its_data_whichever_data_transformer_altair_has_active(trained_mlp, digits):
    """Altair's data transformer is global to all threads and Streamlit switches it, while it
    converts another session's `st.altair_chart`, to one that files the data elsewhere. The live
    charts are converted in a session's own thread, and must carry their data all the same."""
    import altair as alt

    from jointcomp.records import curve_frame, epochs_frame, layers_frame, steps_frame
    from jointcomp.trainer import EngineConfig, Engine

    history = list(Engine(trained_mlp, digits, EngineConfig(target="50x", epochs=2, tradeoff=True, device="cpu")))
    live = charts.live(epochs_frame(history), layers_frame(history), steps_frame(history), curve_frame(history), 0.97, 1000)
    alt.data_transformers.register("filed_elsewhere", lambda data: {"name": "filed-elsewhere"})
    with alt.data_transformers.enable("filed_elsewhere"):
        specs = [charts.vega_lite(chart) for chart in live.values()]
    for spec in specs:
        refs = dataset_refs(spec)
        assert refs and all(len(spec["datasets"].get(name, [])) > 0 for name in refs), spec.get("title")


def test_a_bops_run_draws_bit_operations_not_kilobytes():
    """In the bops budget mode a record's size and target are bit-operations: the size chart draws them in
    MBOPs without a .jcz line (bytes on the same axis would mean nothing); the trade-off's axis says so, and the
    multipliers price a bit-operation, not a bit."""
    epochs = pd.DataFrame([{"epoch": e, "phase": "admm", "accuracy": 0.9, "size_bits": 2.0e6, "target_bits": 2.5e6,
                            "file_bytes": 9000} for e in range(3)])
    spec = charts.size_over_epochs(epochs, "bops").to_dict()
    data = pd.DataFrame(next(iter(spec["datasets"].values())))
    assert set(data["what"]) == {"bops budget", "target"}
    assert sorted(data["value"].unique()) == [2.0, 2.5]
    assert spec["encoding"]["y"]["title"] == "bit-operations (MBOPs)"
    paper = pd.DataFrame(next(iter(charts.size_over_epochs(epochs).to_dict()["datasets"].values())))
    assert set(paper["what"]) == {"paper size", "target", ".jcz file"} and 9.0 in set(paper["value"])
    curve = pd.DataFrame([{"epoch": 0, "phase": "admm", "size_bits": 1.0e6, "file_bytes": 9000, "accuracy": 0.9}])
    axis = charts.tradeoff(curve, epochs, budget_mode="bops").to_dict()["layer"][0]["encoding"]["x"]["title"]
    assert axis == "bit-operations (MBOPs, log scale)"
    lambdas = epochs.assign(lambda_prune=1e-3, lambda_quant=2e-3)
    assert charts.multipliers(lambdas, "bops").to_dict()["encoding"]["y"]["title"] == "squared error per bit-operation (log)"
    assert charts.multipliers(lambdas, "file").to_dict()["encoding"]["y"]["title"] == "squared error per bit (log)"


@pytest.mark.parametrize("chart", [charts.sweep, charts.runs])
def test_a_size_axis_ends_at_the_sizes_shown(chart):
    """Vega rounds a log domain out to powers of ten: sizes of 1-10.1 KB were drawn on an axis to
    100 KB, their lines squashed into the left half of the chart."""
    frame = pd.DataFrame({"size_kb": [1.0086, 2.017, 4.034, 10.086], "accuracy": [0.96, 0.965, 0.97, 0.972],
                          "method": "admm", "target": ["200x", "100x", "50x", "20x"], "ratio": [200, 100, 50, 20],
                          "run": "r", "model": "mlp", "data": "digits", "file_bytes": 1000})
    scale = chart(frame).to_dict()["encoding"]["x"]["scale"]
    assert scale["type"] == "log" and scale.get("nice") is False
