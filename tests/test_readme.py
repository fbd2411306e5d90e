"""The README's user-loop example runs as written, in a fresh process, and does what it says."""
import re
import subprocess
import sys
from pathlib import Path

from jointcomp import inspect

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_user_loop_example_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    example = next(b for b in blocks if "jointcomp.Compressor(" in b)
    result = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    ratio, file_bytes, accuracy = re.search(r"([\d.]+)x smaller \(paper size\), file (\d+) B, accuracy ([\d.]+)",
                                            result.stdout).groups()
    path = tmp_path / "model.jcz"
    report = inspect(path)
    assert path.stat().st_size == int(file_bytes) == report.file_bytes
    assert float(ratio) >= 50 * (1 - 1e-9)
    assert report.paper_bits <= 32 * report.compressible_numel / 50  # read from the file itself
    assert float(accuracy) >= 0.9  # the dense MLP reaches about 0.97 on digits
