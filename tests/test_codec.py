"""The .jcz file: exact round trip, honest sizes, byte budgets, and safe loading of
damaged or hostile files (including a fuzzer over a real checkpoint)."""
from __future__ import annotations

import json
import os
import random
import struct
import sys
import zlib

import pytest
import torch
import zstandard
from torch.func import functional_call

from jointcomp import CheckpointError, CompressConfig, Engine, inspect, load_compressed
from jointcomp.codec import encode_positions, decode_positions, pack_codes, unpack_codes

META = {"model": "mlp", "data": "digits", "input_shape": [1, 8, 8], "num_classes": 10}


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory, digits, _trained_mlp_state):
    from jointcomp import build_model

    model = build_model("mlp", digits.input_shape, digits.num_classes)
    model.load_state_dict(_trained_mlp_state)
    engine = Engine(model, digits, CompressConfig(target="60x", epochs=3, device="cpu"), meta=META)
    list(engine)
    path = tmp_path_factory.mktemp("ckpt") / "model.jcz"
    engine.export(str(path))
    return engine, path


def test_round_trip_is_bit_exact(compressed_run, digits):
    engine, path = compressed_run
    deployable = dict(zip(engine.names, engine.final.values))
    engine.model.eval()
    with torch.no_grad():
        expected = functional_call(engine.model, deployable, (digits.val_x,))
        loaded = load_compressed(path)
        got = loaded(digits.val_x)
    assert torch.equal(got, expected)
    for name, values in deployable.items():
        assert torch.equal(loaded.state_dict()[name], values)


def test_inspect_tells_the_truth(compressed_run):
    _, path = compressed_run
    report = inspect(path)
    assert report.file_bytes == os.path.getsize(path)
    loaded = load_compressed(path).state_dict()
    paper_bits, numel = 0, 0
    for row in report.layers:
        w = loaded[row.name]
        nonzero = w[w != 0]
        assert row.nnz == nonzero.numel()
        assert nonzero.unique().numel() <= 2**row.bits
        assert row.codes_bytes <= (row.nnz * row.bits + 7) // 8
        assert row.codebook_bytes == 4 * 2**row.bits
        paper_bits += row.bits * row.nnz
        numel += w.numel()
    assert report.paper_bits == paper_bits
    assert report.fp32_bytes == 4 * sum(t.numel() for t in loaded.values())
    parts = sum(r.codes_bytes + r.positions_bytes + r.codebook_bytes for r in report.layers)
    assert parts + report.dense_bytes + report.header_bytes + 4 == report.file_bytes
    assert report.paper_ratio == pytest.approx(32 * numel / paper_bits)


@pytest.mark.parametrize("density", [0.0005, 0.01, 0.2, 0.5, 0.97, 1.0])
def test_positions_round_trip_and_beat_a_bitmap(density):
    g = torch.Generator().manual_seed(int(density * 1e4))
    mask = torch.rand(300, 70, generator=g) < density
    name, data = encode_positions(mask)
    assert torch.equal(decode_positions(name, data, mask.numel(), int(mask.sum())).view(mask.shape), mask)
    assert len(data) <= (mask.numel() + 7) // 8


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_pack_at_exactly_b_bits(bits):
    codes = torch.randint(0, 2**bits, (1001,))
    data = pack_codes(codes, bits)
    assert len(data) == (1001 * bits + 7) // 8
    assert torch.equal(unpack_codes(data, 1001, bits), codes)


def test_file_budget_is_met_by_the_actual_file(trained_mlp, digits, tmp_path):
    config = CompressConfig(target="6KB", epochs=4, budget_mode="file", device="cpu")
    engine = Engine(trained_mlp, digits, config, run_dir=str(tmp_path), meta=META)
    records = list(engine)
    assert os.path.getsize(tmp_path / "model.jcz") <= 6000
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["file_bytes"] == os.path.getsize(tmp_path / "model.jcz")
    assert summary["file_ratio"] == pytest.approx(4 * sum(t.numel() for t in trained_mlp.state_dict().values()) / summary["file_bytes"])
    assert records[-1].accuracy > 0.85  # still a working classifier


# --- safety ----------------------------------------------------------------------------
def split(data: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<I", data[4:8])
    header = json.loads(zstandard.ZstdDecompressor().decompress(data[8 : 8 + n]))
    return header, data[8 + n : -4]


def build(header: dict, body: bytes, version: int = 1) -> bytes:
    hz = zstandard.ZstdCompressor().compress(json.dumps(header).encode())
    head = b"JCZ" + bytes([version]) + struct.pack("<I", len(hz)) + hz + body
    return head + struct.pack("<I", zlib.crc32(head))


def expect_error(path, data: bytes, match: str | None = None) -> None:
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match):
        load_compressed(path)


def test_damaged_files_raise_checkpoint_error(compressed_run, tmp_path):
    _, good = compressed_run
    data = good.read_bytes()
    bad = tmp_path / "bad.jcz"
    expect_error(bad, data[: len(data) // 2], "checksum")
    expect_error(bad, data[:5], "not a jointcomp checkpoint")
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0x10
    expect_error(bad, bytes(flipped), "checksum")
    expect_error(bad, random.Random(0).randbytes(5000), "not a jointcomp checkpoint")
    expect_error(bad, b"", "not a jointcomp checkpoint")
    header, body = split(data)
    expect_error(bad, build(header, body, version=9), "version 9")
    huge = data[:4] + struct.pack("<I", 2**31) + data[8:-4]
    expect_error(bad, huge + struct.pack("<I", zlib.crc32(huge)), "header length")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_compressed(tmp_path / "missing.jcz")


def test_sizes_larger_than_the_file_justifies_are_refused(compressed_run, tmp_path):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    header["d"][0][2] = [10**12]  # a bias claiming a trillion entries
    expect_error(tmp_path / "bad.jcz", build(header, body), "larger than this file can justify")
    header, body = split(good.read_bytes())
    header["model"]["input_shape"] = [1, 100000, 100000]  # a model far larger than the tensors stored
    expect_error(tmp_path / "bad.jcz", build(header, body), "do not match")


def test_code_is_never_imported_without_permission(compressed_run, tmp_path, monkeypatch):
    _, good = compressed_run
    marker = tmp_path / "imported"
    (tmp_path / "sneaky_factory.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nimport jointcomp.models\nmake = jointcomp.models.mlp\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    header, body = split(good.read_bytes())
    header["model"]["model"] = "sneaky_factory:make"
    path = tmp_path / "user.jcz"
    expect_error(path, build(header, body), "allow_import=True")
    assert not marker.exists()
    model = load_compressed(path, allow_import=True)  # the caller trusts it: now it may import
    assert marker.exists() and sum(p.numel() for p in model.parameters()) > 0
    sys.modules.pop("sneaky_factory", None)


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del buf[rng.randrange(len(buf)) :]
    elif kind == 2:
        pos = rng.randrange(len(buf))
        buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
    else:
        pos = rng.randrange(len(buf))
        buf[pos : pos + 8] = rng.randbytes(8)
    return bytes(buf)


def resign(data: bytes) -> bytes:
    """Fix the checksum so that the parser's own checks meet the damage."""
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])) if len(data) > 4 else data


def mutate_header(header: dict, rng: random.Random) -> dict:
    h = json.loads(json.dumps(header))
    table = rng.choice(["c", "d"])
    row = rng.choice(h[table])
    i = rng.randrange(len(row))
    row[i] = rng.choice([-1, 0, 7, 2**40, "x", None, [], [2**20, 2**20], 3.5, row[i]])
    if rng.random() < 0.2:
        h[rng.choice(["dl", "dr", "de", "v"])] = rng.choice([-5, 0, 10**9, "zstd", "raw", None])
    return h


FUZZ_CASES = int(os.environ.get("JOINTCOMP_FUZZ", "1500"))  # raise it for a longer fuzz


def test_fuzzed_checkpoints_only_raise_checkpoint_error(compressed_run, tmp_path):
    _, good = compressed_run
    data = good.read_bytes()
    header, body = split(data)
    rng = random.Random(1234)
    path = tmp_path / "fuzz.jcz"
    outcomes = {"error": 0, "loaded": 0}
    for i in range(FUZZ_CASES):
        if i % 3 == 0:
            case = mutate(data, rng)  # raw damage: the checksum catches it
        elif i % 3 == 1:
            case = resign(mutate(data, rng))  # damage behind a valid checksum
        else:
            case = build(mutate_header(header, rng), body)  # a well-formed but lying header
        path.write_bytes(case)
        try:
            load_compressed(path)
            outcomes["loaded"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] > FUZZ_CASES * 0.5, outcomes
