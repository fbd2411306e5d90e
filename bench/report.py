"""Results at a glance, made from the stored bench rows (bench/results/*.jsonl) without running
anything: README's results table and one plot per network (bench/plots/NETWORK-DATA.svg, accuracy
against `.jcz` bytes on a log axis, one mark per method, the seeds' min-max as a bar, dense as a line),
accuracy against epoch where a training grid ran from both starts (bench/plots/epochs-*.svg), and
BENCHMARKS' tables of stored runs: each between `<!-- rows: GRID key=value ... -->` (the rows of
bench/results/GRID.jsonl whose fields have those values) and `<!-- end of rows -->`.

    python bench/report.py        # what `make plots` runs

A row of the table is a network, data set, target and dense start with a post-training or a
training run of jointcomp; its baselines are the other methods measured at the same target (the untrained
projection and uniform allocation beside posttrain; uniform and sequential beside admm).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import altair as alt
import pandas as pd

from jointcomp import EngineConfig
from jointcomp.bops import format_bops
from jointcomp.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PLOTS = ROOT / "bench" / "plots"
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"
ROWS_BLOCK = re.compile(r"(<!-- rows: (\w+)((?: \w+=\S+)*) -->\n).*?(<!-- end of rows -->)", re.S)
BEGIN = "<!-- results: written by `make plots` from bench/results/*.jsonl -->"
END = "<!-- end of results -->"
PEER_MODE = "its own"  # the budget mode of a peer tool's row (bench/peers.py): its setting, in its own terms
README_GRIDS = ("posttrain", "quality")  # the grids whose runs are README's rows (peers.py's are its best-peer column)
BASELINES = {"untrained_projection": "untrained projection", "uniform_allocation": "uniform allocation, post-training"}
BESIDE = {**BASELINES, "sketch": "posttrain's sketch (the app's quick what-if)"}  # measured beside a run: its table's columns


def load_rows() -> pd.DataFrame:
    """Every stored run, one row each, with the grid (file) it came from."""
    rows = [{**json.loads(line), "grid": path.stem} for path in sorted(RESULTS.glob("*.jsonl"))
            for line in path.read_text().splitlines() if line.strip()]
    return pd.DataFrame(rows)


def series(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per network, data, target and method (with its start and epochs): accuracy mean and
    min-max over the seeds, mean file bytes, the dense accuracy, the grid and one run's command. A peer
    tool's file is larger than the dense model's (BENCHMARKS.md, Peers): its size is its own count."""
    if "nominal_bytes" in rows:
        rows = rows.assign(file_bytes=rows["nominal_bytes"].where(rows["budget_mode"] == PEER_MODE, rows["file_bytes"]))
    runs = rows.assign(method=rows["method"].where(rows["epochs"] == 0, rows["method"] + ", trained " +
                                                   rows["epochs"].astype(str) + " epochs from " + rows.get("start", "")))
    other_mode = ~rows["budget_mode"].isin(["paper", PEER_MODE])  # a target in another budget mode is another target
    runs = runs.assign(method=runs["method"].where(~other_mode, runs["method"] + ", " + runs["budget_mode"] + " budget"),
                       target=runs["target"].where(~other_mode, runs["target"] + " " + runs["budget_mode"]))
    baselines = [rows.dropna(subset=[column]).assign(method=name, accuracy=rows[column]) for column, name in BASELINES.items()
                 if column in rows]
    keys = ["network", "data", "target", "method", "grid"]  # runs of two grids have their own dense starts
    return (pd.concat([runs, *baselines]).groupby(keys, sort=False)
            .agg(accuracy=("accuracy", "mean"), low=("accuracy", "min"), high=("accuracy", "max"),
                 seeds=("seed", "nunique"), file_bytes=("file_bytes", "mean"), dense=("dense_accuracy", "mean"),
                 command=("command", "first"))
            .reset_index())


def plot(points: pd.DataFrame, title: str) -> alt.LayerChart:
    """Accuracy against file bytes (log), one colour per method, the seeds' min-max as bars."""
    x = alt.X("file_bytes:Q", scale=alt.Scale(type="log", nice=False, padding=24), title=".jcz file (a peer: its own count), bytes, log scale")
    y = alt.Y("accuracy:Q", title="accuracy", scale=alt.Scale(zero=False, padding=12), axis=alt.Axis(format="%"))
    color = alt.Color("method:N", title=None, scale=alt.Scale(scheme="category20"),  # up to 20 methods, each its own colour
                      legend=alt.Legend(orient="bottom", columns=2, labelLimit=400))
    marks = alt.Chart(points).mark_line(point=alt.OverlayMarkDef(filled=True, size=70)).encode(
        x=x, y=y, color=color, order="file_bytes:Q")
    bars = alt.Chart(points).mark_rule(strokeWidth=2).encode(x=x, y="low:Q", y2="high:Q", color=color)
    dense = alt.Chart(pd.DataFrame({"dense": [points["dense"].mean()]})).mark_rule(strokeDash=[4, 4], color="gray").encode(
        y="dense:Q")
    low, high = points["dense"].min(), points["dense"].max()
    dense_text = f"{low:.2%}" if high - low < 5e-5 else f"{low:.2%}-{high:.2%}, its starts differ by grid"
    return (dense + bars + marks).properties(width=520, height=320, title=f"{title} (dashed: dense, {dense_text})")


def epochs_plot(rows: pd.DataFrame, title: str) -> alt.LayerChart:
    """Accuracy of the deployable model after each epoch, one line per start (mean over the seeds,
    the band their min-max); epoch 0 is the calibrated start."""
    long = pd.DataFrame([{"start": r["start"], "seed": r["seed"], "epoch": e + 1, "accuracy": a}
                         for _, r in rows.iterrows() for e, a in r["epoch_accuracy"]])
    band = long.groupby(["start", "epoch"]).agg(mean=("accuracy", "mean"), low=("accuracy", "min"),
                                                high=("accuracy", "max")).reset_index()
    x = alt.X("epoch:Q", title="epoch (0: the calibrated start)", axis=alt.Axis(tickMinStep=1, format="d"))
    color = alt.Color("start:N", title="start", legend=alt.Legend(orient="bottom"))
    area = alt.Chart(band).mark_area(opacity=0.2).encode(x=x, y="low:Q", y2="high:Q", color=color)
    line = alt.Chart(band).mark_line(point=True).encode(
        x=x, y=alt.Y("mean:Q", title="accuracy", scale=alt.Scale(zero=False), axis=alt.Axis(format="%")), color=color)
    return (area + line).properties(width=520, height=300, title=title)


def block_sections() -> list[tuple[str, dict[str, str], str]]:
    """Every rows block of BENCHMARKS.md, in order: its grid, its conditions and the anchor of the
    section ("## " heading) it stands in."""
    found, anchor = [], ""
    for line in BENCHMARKS.read_text().splitlines():
        if line.startswith("## "):
            anchor = re.sub(r"[^\w\- ]", "", line[3:].strip().lower()).replace(" ", "-")
        block = re.match(r"<!-- rows: (\w+)((?: \w+=\S+)*) -->", line)
        if block:
            found.append((block.group(1), dict(c.split("=", 1) for c in block.group(2).split()), anchor))
    return found


def section_of(runs: pd.DataFrame, grid: str, blocks: list[tuple[str, dict[str, str], str]]) -> str:
    """The anchor of the first BENCHMARKS section whose table of `grid` holds one of `runs`."""
    for block_grid, conditions, anchor in blocks:
        chosen = runs[runs["grid"] == grid] if block_grid == grid else runs.iloc[:0]
        for key, value in conditions.items():
            chosen = chosen[chosen[key].astype(str) == value] if key in chosen else chosen.iloc[:0]
        if len(chosen):
            return anchor
    raise SystemExit(f"BENCHMARKS.md has no table of {grid} rows for {runs.iloc[0]['network']} at "
                     f"{runs.iloc[0]['target']}: add a `<!-- rows: {grid} ... -->` block")


def table(points: pd.DataFrame, rows: pd.DataFrame) -> str:
    """README's table: per network, data and target, jointcomp trained and post-training, the best
    baseline and the best peer, each linked to the BENCHMARKS section whose table holds its runs."""
    blocks = block_sections()
    lines = ["| network / data | dense | target | jointcomp, trained | jointcomp, post-training | best baseline | "
             "best peer at no more bytes | file bytes | section |", "|---|---|---|---|---|---|---|---|---|"]
    peers = points[points["grid"] == "peers"]
    peers = peers[~peers["method"].str.split(",").str[0].isin(METHODS)]  # the tools', not jointcomp's runs beside them
    for (network, data, target, _), group in points[points["grid"].isin(README_GRIDS)].groupby(
            ["network", "data", "target", "dense"], sort=False):
        trained = group[group["method"].str.startswith("admm, trained") &
                        group["method"].str.contains(f"from {EngineConfig.start}")]  # with the defaults
        post = group[group["method"] == "posttrain"]
        ours = pd.concat([trained, post])
        if ours.empty:
            continue
        jointcomp = group["method"].str.startswith("admm") | (group["method"] == "posttrain")
        others = group[~jointcomp].sort_values("accuracy", ascending=False)
        best = f"{others.iloc[0]['accuracy']:.4f} ({others.iloc[0]['method']})" if len(others) else "—"
        cell = lambda rows: "—" if rows.empty else f"{rows.iloc[0]['accuracy']:.4f}"  # noqa: E731
        plain, _, mode = target.partition(" ")  # "200x bops": a target in another budget mode than the paper's
        runs = rows[(rows["network"] == network) & (rows["data"] == data) & (rows["target"] == plain) &
                    (rows["budget_mode"] == (mode or "paper"))]
        links = ", ".join(f"[{grid}](BENCHMARKS.md#{section_of(runs, grid, blocks)})" for grid in dict.fromkeys(ours["grid"]))
        size = ours.iloc[0]["file_bytes"]
        lines.append(f"| {network} / {data} | {ours.iloc[0]['dense']:.4f} | {target} | {cell(trained)} | {cell(post)} | "
                     f"{best} | {best_peer(peers[(peers['network'] == network) & (peers['data'] == data)], size)} | "
                     f"{size:,.0f} | {links} |")
    return "\n".join(lines)


def best_peer(peers: pd.DataFrame, size: float) -> str:
    """The most accurate peer result whose file is no larger than `size` bytes; or the smallest any peer reached."""
    if peers.empty:
        return "not measured"
    fitting = peers[peers["file_bytes"] <= size].sort_values("accuracy", ascending=False)
    if fitting.empty:
        return f"none this small (smallest: {peers['file_bytes'].min():,.0f} B)"
    best = fitting.iloc[0]
    return f"{best['accuracy']:.4f} ({best['method']} {best['target']}, {best['file_bytes']:,.0f} B by its own count)"


def grid_table(rows: pd.DataFrame) -> str:
    """A BENCHMARKS table of stored runs: per target, budget mode, method and start, the seeds' accuracy
    (or validation loss, for a language model) mean (min-max), what was measured beside it (BESIDE:
    the baselines and posttrain's sketch, where the rows have them), the change from dense, sizes,
    bit-operations, minutes and the first seed's command."""
    metric = "accuracy" if "accuracy" in rows and rows["accuracy"].notna().any() else "validation_loss"
    beside = [column for column in BESIDE if column in rows and rows[column].notna().any()]
    change = "loss to dense, points" if metric == "accuracy" else "above dense, %"
    peers = "nominal_bytes" in rows and bool(rows["nominal_bytes"].notna().any())
    lines = [f"| target | budget | method | start | epochs | seeds | {metric.replace('_', ' ')} mean (min-max) | " +
             "".join(f"{BESIDE[column]} | " for column in beside) + f"{change} | "
             "paper bits | .jcz bytes (a peer's: its exported file) | " + ("a peer's own size count, B | " if peers else "") +
             f"BOPs (x fewer than dense) | minutes per run | commit | command (seed {rows['seed'].min()}) |",
             "|---" * (14 + len(beside) + peers) + "|"]
    keys = ["target", "budget_mode", "method", "start", "epochs"]
    for (target, mode, method, start, epochs), g in rows.fillna({"start": "—"}).groupby(keys, sort=False):
        g = g.sort_values("seed")
        counted = "bops" in g and g["bops"].notna().all() and (g["bops"] > 0).all()  # runs before BOPs: not
        bops = f"{format_bops(g['bops'].mean())} ({g['bops_ratio'].mean():.0f}x)" if counted else "—"
        dense = g[f"dense_{metric}"]
        moved = 100 * (dense - g[metric]) if metric == "accuracy" else 100 * (g[metric] / dense - 1)
        lines.append(
            f"| {target} | {mode} | {method} | {start} | {epochs} | {', '.join(map(str, g['seed']))} | "
            f"{g[metric].mean():.4f} ({g[metric].min():.4f}-{g[metric].max():.4f}) | " +
            "".join(f"{g[column].mean():.4f} | " if g[column].notna().any() else "— | " for column in beside) +
            f"{moved.mean():.2f} | {_mean(g, 'paper_bits')} | {_mean(g, 'file_bytes')} | " +
            (f"{_mean(g, 'nominal_bytes')} | " if peers else "") + f"{bops} | "
            f"{g['minutes'].mean():.1f} | {', '.join(dict.fromkeys(g['commit']))} | `{g.iloc[0]['command']}` |")
    return "\n".join(lines)


def _mean(rows: pd.DataFrame, column: str) -> str:
    """The mean of a size column, or a dash where these runs do not have it."""
    return f"{rows[column].mean():,.0f}" if column in rows and rows[column].notna().any() else "—"


def write_grid_tables(rows: pd.DataFrame) -> int:
    """Fill every rows block of BENCHMARKS.md from the stored rows; returns how many."""
    text, count = BENCHMARKS.read_text(), 0

    def fill(match: re.Match) -> str:
        nonlocal count
        chosen = rows[rows["grid"] == match.group(2)]
        for condition in match.group(3).split():
            key, value = condition.split("=", 1)
            chosen = chosen[chosen[key].astype(str) == value]
        if chosen.empty:
            raise SystemExit(f"BENCHMARKS.md: no stored rows for {match.group(1).strip()}")
        count += 1
        return f"{match.group(1)}{grid_table(chosen)}\n{match.group(4)}"

    BENCHMARKS.write_text(ROWS_BLOCK.sub(fill, text))
    return count


def main() -> None:
    rows = load_rows()
    points = series(rows[rows["accuracy"].notna()])  # a language model's rows (validation loss) are a table only
    PLOTS.mkdir(exist_ok=True)
    images = []
    trained = rows[rows["grid"] == "quality"] if "epoch_accuracy" in rows else rows.iloc[:0]
    for (network, data, target, method), group in trained.dropna(subset=["epoch_accuracy"]).groupby(
            ["network", "data", "target", "method"], sort=False):
        if group["start"].nunique() > 1:
            name = f"epochs-{network.replace(':', '.')}-{data}-{target}-{method}.svg"
            epochs_plot(group, f"{network} on {data} at {target}, {method}: from dense and from calibrated").save(
                str(PLOTS / name))
            images.append(f"![{network} at {target}, by epoch](bench/plots/{name})")
    for (network, data), group in points.groupby(["network", "data"], sort=False):
        name = f"{network.replace(':', '.')}-{data}.svg"
        plot(group, f"{network} on {data}").save(str(PLOTS / name))
        images.append(f"![{network} on {data}](bench/plots/{name})")
    text = README.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    section = (f"{BEGIN}\n{table(points, rows)}\n\nMean over the seeds (two per row); every run's command and commit are in "
               f"`bench/results/*.jsonl`.\n\n" + "\n".join(images) + f"\n{END}")
    README.write_text(head + section + tail)
    tables = write_grid_tables(rows)
    print(f"{len(images)} plots in {PLOTS.relative_to(ROOT)}, README's results table and {tables} tables of "
          "BENCHMARKS.md updated")


if __name__ == "__main__":
    main()
