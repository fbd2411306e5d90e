"""The README's user-loop example runs as written, in a fresh process, and does what it says."""
import json
import re
import subprocess
import sys
from pathlib import Path

from jointcomp import inspect_file

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_user_loop_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "jointcomp.Compressor(" in b)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ratio, file_bytes, accuracy = re.search(r"([\d.]+)x smaller \(paper size\), file (\d+) B, accuracy ([\d.]+)",
                                            result.stdout).groups()
    path = tmp_path / "model.jcz"
    report = inspect_file(path)
    assert path.stat().st_size == int(file_bytes) == report.file_bytes
    assert float(ratio) >= 50 * (1 - 1e-9)
    assert report.paper_bits <= 32 * report.compressible_numel / 50  # read from the file itself
    assert float(accuracy) >= 0.9  # the dense MLP reaches about 0.97 on digits


def test_every_number_in_the_results_table_is_in_the_stored_bench_rows():
    """README's results table is made from bench/results/*.jsonl: each accuracy in it is the mean
    over the seeds of one method's stored runs at that network, data and target, and each file
    size the mean of one method's stored file bytes."""
    rows = [{**json.loads(line), "grid": path.stem} for path in (README.parent / "bench" / "results").glob("*.jsonl")
            for line in path.read_text().splitlines() if line.strip()]  # a grid's runs have its own dense starts
    table = README.read_text().split("<!-- results:")[1].split("<!-- end of results -->")[0]
    lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| network")]
    assert len(lines) >= 4
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        network, data = cells[0].split(" / ")
        target, _, mode = cells[2].partition(" ")  # "200x bops": a target in another budget mode than the paper's
        same = [r for r in rows if (r["network"], r["data"], r["target"], r["budget_mode"]) == (network, data, target, mode or "paper")]
        peers = [r for r in rows if (r["network"], r["data"], r["budget_mode"]) == (network, data, "its own")]
        runs: dict[tuple, list[dict]] = {}
        for r in same + peers:  # a peer's accuracy: the best peer at no more bytes
            runs.setdefault((r["grid"], r["method"], r["target"], r.get("start"), r["epochs"]), []).append(r)
        means, sizes = set(), set()
        for group in runs.values():
            for key in ("accuracy", "untrained_projection", "uniform_allocation", "dense_accuracy"):
                if key in group[0]:
                    means.add(f"{sum(r[key] for r in group) / len(group):.4f}")
            sizes.add(f"{sum(r['file_bytes'] or 0 for r in group) / len(group):,.0f}")
        figures = re.findall(r"\b\d\.\d{4}\b", line)
        assert len(figures) >= 2 and set(figures) <= means, (line, means)
        assert cells[7] in sizes, (line, sizes)


def test_every_generated_table_of_benchmarks_is_the_stored_rows():
    """Each line of a `<!-- rows: GRID key=value -->` table in BENCHMARKS.md is the mean and min-max
    over the seeds of the stored runs with those values and that target, method, start and epochs."""
    stored = {path.stem: [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
              for path in (README.parent / "bench" / "results").glob("*.jsonl")}
    text = (README.parent / "BENCHMARKS.md").read_text()
    blocks = re.findall(r"<!-- rows: (\w+)((?: \w+=\S+)*) -->\n(.*?)<!-- end of rows -->", text, re.S)
    assert blocks
    for grid, conditions, table in blocks:
        wanted = dict(c.split("=", 1) for c in conditions.split())
        rows = [r for r in stored[grid] if all(str(r.get(k)) == v for k, v in wanted.items())]
        lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| target")]
        assert lines, grid
        for line in lines:
            target, mode, method, start, epochs, seeds, accuracy = [c.strip() for c in line.strip("|").split("|")][:7]
            runs = [r for r in rows if (r["target"], r["budget_mode"], r["method"], r.get("start", "—"), str(r["epochs"]))
                    == (target, mode, method, start, epochs)]
            assert sorted(str(r["seed"]) for r in runs) == seeds.split(", "), line
            accs = [r["accuracy"] if "accuracy" in r else r["validation_loss"] for r in runs]
            assert accuracy == f"{sum(accs) / len(accs):.4f} ({min(accs):.4f}-{max(accs):.4f})", line
