"""The C and ONNX exports: the generated C is compiled with the system compiler (warnings as
errors) and run on real images; its outputs, its flash bytes and ONNX Runtime's outputs are
checked against PyTorch and the object file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from torch import nn

import jointcomp
from jointcomp.deploy.c import export_c

from c_runtime import compile_c, const_bytes, run_c
from command import refused

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jointcomp", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def compress_to_file(model: nn.Module, path: Path, target: str, meta: dict | None = None, **options) -> Path:
    """The allocation the method starts from (one projection, no training), as a .jcz file."""
    comp = jointcomp.Compressor(model, target=target, steps=1, meta=meta, **options)
    comp.finish()
    comp.export(str(path))
    return path


def assert_same_predictions(program: Path, model: nn.Module, x: torch.Tensor) -> None:
    ours = run_c(program, x)
    with torch.no_grad():
        reference = model(x)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-4
    assert torch.equal(ours.argmax(1), reference.argmax(1))


class ConvZoo(nn.Module):
    """Every convolution feature the export supports in one net: BatchNorm alone and after a
    convolution, grouped and strided convolution without bias, dilation with 'same' padding,
    average pooling without the padding in the count, padded max pooling, dropout, a view."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(1)
        self.a = nn.Conv2d(1, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=4, bias=False)
        self.b_norm = nn.BatchNorm2d(8)
        self.c = nn.Conv2d(8, 16, 3, padding="same", dilation=2)
        self.avg = nn.AvgPool2d(2, padding=1, count_include_pad=False)
        self.max = nn.MaxPool2d(3, stride=1, padding=1)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(16 * 3 * 3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(self.norm(x)))
        y = nn.functional.relu(self.c(self.b_norm(self.b(y))))
        y = self.max(self.avg(y))
        return self.fc(self.drop(y.view(y.size(0), -1)))


def with_batchnorm_statistics(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters far from the identity, so folding them is tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.6 - 0.3)
    return model.eval()


def test_mlp_in_c_predicts_digits_as_pytorch_does(trained_mlp, digits, tmp_path):
    meta = {"model": "mlp", "input_shape": list(digits.input_shape), "num_classes": digits.num_classes}
    path = compress_to_file(trained_mlp, tmp_path / "mlp.jcz", "50x", meta)
    result = cli("export-c", str(path), "--out", str(tmp_path / "c"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    flash = int(result.stdout.split("flash ")[1].split(" B")[0])
    model = jointcomp.load_compressed(path)
    program = compile_c(tmp_path / "c")
    assert_same_predictions(program, model, digits.val_x)
    assert const_bytes(tmp_path / "c") == flash  # what the command says is what the compiler placed
    assert flash < path.stat().st_size * 1.5  # the packed form, not float32 weights (those are 205 KB)
    shown = cli("inspect", str(path), cwd=tmp_path)
    assert f"C export (export-c): flash {flash} B" in shown.stdout


def test_lenet5_in_c_predicts_fashion_mnist_as_pytorch_does(tmp_path):
    data = jointcomp.load_dataset("fashion-mnist")
    torch.manual_seed(0)
    model = jointcomp.build_model("lenet5", data.input_shape, data.num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for x, y in zip(data.train_x[:6400].split(128), data.train_y[:6400].split(128)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    meta = {"model": "lenet5", "input_shape": list(data.input_shape), "num_classes": data.num_classes}
    path = compress_to_file(model, tmp_path / "lenet5.jcz", "100x", meta)
    assert cli("export-c", str(path), "--out", str(tmp_path / "c"), cwd=tmp_path).returncode == 0
    reloaded = jointcomp.load_compressed(path)
    assert_same_predictions(compile_c(tmp_path / "c"), reloaded, data.val_x[:500])


@pytest.mark.parametrize("name", ["conv_zoo", "resnet20"])
def test_batchnorm_residual_and_conv_variants_in_c(name, digits, tmp_path):
    def make() -> nn.Module:
        torch.manual_seed(0)
        return ConvZoo() if name == "conv_zoo" else jointcomp.build_model("resnet20", digits.input_shape, 10)

    path = compress_to_file(with_batchnorm_statistics(make()), tmp_path / f"{name}.jcz", "8x")
    export = export_c(path, tmp_path / "c", model=make(), input_shape=digits.input_shape)
    reloaded = jointcomp.load_compressed(path, model=make())
    assert_same_predictions(compile_c(tmp_path / "c"), reloaded, digits.val_x)
    assert const_bytes(tmp_path / "c") == export.flash_bytes
    assert "BatchNorm" not in export.source and "jc_add(" in export.source if name == "resnet20" else True


def test_flash_budget_mode_meets_the_c_const_data_target(trained_mlp, digits, tmp_path):
    loader = list(zip(digits.train_x.split(64), digits.train_y.split(64)))
    epochs, target_bytes = 4, 6000
    opt = torch.optim.SGD(trained_mlp.parameters(), lr=0.02, momentum=0.9)
    comp = jointcomp.Compressor(trained_mlp, target=f"{target_bytes}B", budget_mode="flash",
                                steps=epochs * len(loader))
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(trained_mlp(x), y).backward()
            opt.step()
            comp.step(lr=0.02)
    final = comp.finish()
    comp.convert_()
    comp.export(str(tmp_path / "mlp.jcz"))
    export = export_c(tmp_path / "mlp.jcz", tmp_path / "c", model=jointcomp.build_model("mlp", (1, 8, 8), 10),
                      input_shape=digits.input_shape)
    placed = const_bytes(tmp_path / "c")
    assert placed == export.flash_bytes == final.size_bits / 8
    assert placed <= target_bytes
    assert placed > 0.9 * target_bytes  # the budget is used, not left on the table
    accuracy = (trained_mlp(digits.val_x).argmax(1) == digits.val_y).float().mean().item()
    assert accuracy > 0.85


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_onnx_runtime_matches_pytorch(name, trained_mlp, digits, tmp_path):
    torch.manual_seed(0)
    model = trained_mlp if name == "mlp" else with_batchnorm_statistics(
        jointcomp.build_model("resnet20", digits.input_shape, 10))
    meta = {"model": name, "input_shape": list(digits.input_shape), "num_classes": 10}
    path = compress_to_file(model, tmp_path / f"{name}.jcz", "20x", meta)
    result = cli("export-onnx", str(path), "--out", str(tmp_path / "model.onnx"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    x = digits.val_x[:100].float()
    ours = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        reference = jointcomp.load_compressed(path)(x)
    assert (ours - reference).abs().max().item() <= 1e-5


GELU_NET = """
from torch import nn

def make(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.GELU(), nn.Linear(32, num_classes))
"""


def test_unsupported_layer_gets_one_line_naming_it(digits, tmp_path):
    (tmp_path / "gelu_net.py").write_text(GELU_NET)
    sys.path.insert(0, str(tmp_path))
    try:
        import gelu_net

        model = gelu_net.make(digits.input_shape, 10)
    finally:
        sys.path.remove(str(tmp_path))
    meta = {"model": "gelu_net:make", "input_shape": [1, 8, 8], "num_classes": 10}
    path = compress_to_file(model, tmp_path / "gelu.jcz", "10x", meta)
    env = {"PYTHONPATH": str(tmp_path)}
    result = cli("export-c", str(path), "--out", str(tmp_path / "c"), "--allow-import", cwd=tmp_path, env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "'2'" in result.stderr and "GELU" in result.stderr
    assert not (tmp_path / "c" / "model.c").exists()
    refused = cli("export-c", str(path), "--out", str(tmp_path / "c"), cwd=tmp_path, env=env)
    assert refused.returncode == 2 and "allow_import" in refused.stderr
    shown = cli("inspect", str(path), "--allow-import", cwd=tmp_path, env=env)
    assert shown.returncode == 0 and "C export (export-c): not available" in shown.stdout


def test_bad_export_inputs_get_one_line(trained_mlp, digits, tmp_path, capsys):
    meta = {"model": "mlp", "input_shape": [1, 8, 8], "num_classes": 10}
    path = compress_to_file(trained_mlp, tmp_path / "mlp.jcz", "50x", meta)
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    for args in (["export-c", str(path), "--out", str(blocked / "c")],
                 ["export-c", str(path), "--out", str(tmp_path / "c"), "--input-shape", "1,x"],
                 ["export-c", str(tmp_path / "missing.jcz"), "--out", str(tmp_path / "c")],
                 ["export-onnx", str(tmp_path / "missing.jcz"), "--out", str(tmp_path / "m.onnx")]):
        refused(capsys, *args)
