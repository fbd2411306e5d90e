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

from jointcomp import CheckpointError, EngineConfig, Engine, inspect_file, load_compressed
from jointcomp.codec import (
    MAX_ELEMENTS_PER_FILE_BYTE, read_memory_bound, decode_positions, encode_positions, pack_codes, unpack_codes,
)

META = {"model": "mlp", "data": "digits", "input_shape": [1, 8, 8], "num_classes": 10}


@pytest.fixture(scope="module")
def compressed_run(tmp_path_factory, digits, _trained_mlp_state):
    from jointcomp import build_model

    model = build_model("mlp", digits.input_shape, digits.num_classes)
    model.load_state_dict(_trained_mlp_state)
    engine = Engine(model, digits, EngineConfig(target="60x", epochs=3, device="cpu"), meta=META)
    list(engine)
    path = tmp_path_factory.mktemp("ckpt") / "model.jcz"
    engine.export(str(path))
    return engine, path


def test_round_trip_is_bit_exact(compressed_run, digits):
    engine, path = compressed_run
    deployable = dict(zip(engine.compressor.names, engine.final.values))
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
    report = inspect_file(path)
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
    config = EngineConfig(target="6KB", epochs=4, budget_mode="file", device="cpu")
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


# --- memory: reading a file never allocates beyond read_memory_bound ---------------------
def run_in_child(fn) -> tuple[str, int]:
    """Run `fn` in a forked child: its outcome ("loaded", "CheckpointError" or "other") and
    its peak resident memory in bytes (the parent's pages count as they are shared)."""
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(1)
        code = 0
        try:
            fn()
        except CheckpointError:
            code = 1
        except BaseException:
            code = 3
        os._exit(code)
    _, status, usage = os.wait4(pid, 0)
    outcome = {0: "loaded", 1: "CheckpointError"}.get(os.waitstatus_to_exitcode(status), "other")
    return outcome, usage.ru_maxrss * 1024


@pytest.fixture(scope="module")
def idle_child_rss(compressed_run):
    """Peak memory of a child that loads the genuine checkpoint (a 200 KB model): the
    reference that crafted files are measured against. A forked child pays tens of MB of
    torch's own set-up at its first tensor operation; that is no file's doing."""
    return max(run_in_child(lambda: load_compressed(compressed_run[1]))[1] for _ in range(3))


def declared_bytes(header: dict) -> int:
    """S of the bound, recomputed here from a header: 4 bytes per compressed weight, each
    dense tensor at its dtype's size."""
    def numel(shape) -> int:
        return int(torch.Size(shape).numel()) if isinstance(shape, list) else 0
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
                "int8": 1, "uint8": 1, "bool": 1, "complex64": 8, "complex128": 16}
    return (sum(4 * numel(row[1]) for row in header["c"] if isinstance(row, list) and len(row) == 8)
            + sum(itemsize.get(row[1], 16) * numel(row[2]) for row in header["d"] if isinstance(row, list) and len(row) == 3))


def assert_refused_within_bound(path, data: bytes, header: dict, idle_rss: int, match: str | None = None) -> None:
    path.write_bytes(data)
    outcome, peak = run_in_child(lambda: load_compressed(path))
    assert outcome == "CheckpointError"
    bound = read_memory_bound(len(data), min(declared_bytes(header), 4 * MAX_ELEMENTS_PER_FILE_BYTE * len(data)))
    assert peak - idle_rss <= bound, f"{(peak - idle_rss) / 2**20:.1f} MiB used, bound {bound / 2**20:.1f} MiB"
    if match:
        with pytest.raises(CheckpointError, match=match):
            load_compressed(path)


def bomb(size: int, declare: bool = False) -> bytes:
    """A zstd frame of `size` zero bytes that is only a few KB (streamed: never held whole);
    `declare` writes the size into the frame header too."""
    z = zstandard.ZstdCompressor(level=1, write_content_size=declare).compressobj(size=size if declare else -1)
    chunk = bytes(1 << 20)
    return b"".join([z.compress(chunk) for _ in range(size >> 20)] + [z.flush()])


def sections(header: dict, body: bytes) -> tuple[list[bytes], bytes]:
    """The body cut as the header says: per compressed layer codebook, codes, positions; then the dense payload."""
    parts, pos = [], 0
    for row in header["c"]:
        for n in (4 * 2 ** row[2], row[5], row[7]):
            parts.append(body[pos : pos + n])
            pos += n
    return parts, body[pos : pos + header["dl"]]


def forge_content_size(frame: bytes, size: int) -> bytes:
    """The same zstd frame claiming another content size (an 8-byte size field)."""
    fhd = frame[4]
    assert fhd & 0x20 and fhd & 0x03 == 0, "expects a single-segment frame without dictionary"
    old = {0: 1, 1: 2, 2: 4, 3: 8}[fhd >> 6]
    return frame[:4] + bytes([(3 << 6) | (fhd & 0x3F)]) + struct.pack("<Q", size) + frame[5 + old :]


GIB = 2**30


def test_zstd_bombs_and_forged_sizes_are_refused_within_the_memory_bound(compressed_run, tmp_path, idle_child_rss):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    parts, dense = sections(header, body)
    path = tmp_path / "bomb.jcz"

    # the header itself expands to 1 GiB, with and without declaring it
    for frame in (bomb(GIB), bomb(GIB, declare=True)):
        head = b"JCZ\x01" + struct.pack("<I", len(frame)) + frame + body
        assert_refused_within_bound(path, head + struct.pack("<I", zlib.crc32(head)), header, idle_child_rss)
    # random bytes after a zstd magic number, as the header
    frame = b"\x28\xb5\x2f\xfd" + random.Random(3).randbytes(4000)
    head = b"JCZ\x01" + struct.pack("<I", len(frame)) + frame + body
    assert_refused_within_bound(path, head + struct.pack("<I", zlib.crc32(head)), header, idle_child_rss, "damaged")

    # the dense section: a 1 GiB bomb, and a real frame claiming 1 TiB
    for frame in (bomb(GIB), bomb(GIB, declare=True), forge_content_size(zstandard.ZstdCompressor().compress(bytes(dense[:64])), 2**40)):
        h = {**header, "de": "zstd", "dl": len(frame)}
        assert_refused_within_bound(path, build(h, b"".join(parts) + frame), h, idle_child_rss)

    # the first layer's codes and positions sections
    for slot, field, encoding in ((1, 4, "zstd"), (2, 6, "bitmap+zstd"), (2, 6, "gaps+zstd")):
        h = json.loads(json.dumps(header))
        frame = bomb(GIB // 4)
        h["c"][0][field] = encoding
        h["c"][0][field + 1] = len(frame)
        crafted = list(parts)
        crafted[slot] = frame
        assert_refused_within_bound(path, build(h, b"".join(crafted) + dense), h, idle_child_rss)


def test_headers_claiming_huge_tensors_are_refused_before_allocating(compressed_run, tmp_path, idle_child_rss):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    path = tmp_path / "claims.jcz"
    for table, row, field, value in (("d", 0, 2, [10**12]), ("c", 0, 1, [2**31, 2**31]), ("d", 1, 2, [2**20, 2**20])):
        h = json.loads(json.dumps(header))
        h[table][row][field] = value
        assert_refused_within_bound(path, build(h, body), h, idle_child_rss, "larger than this file can justify")

    # a layer just under the cap whose positions are a real (bitmap-sized) bomb of zeros
    n = len(good.read_bytes())
    numel = MAX_ELEMENTS_PER_FILE_BYTE * n // 2
    parts, dense = sections(header, body)
    h = json.loads(json.dumps(header))
    frame = bomb((numel + 7) // 8 // 2**20 * 2**20)
    h["c"][0][1], h["c"][0][3], h["c"][0][6], h["c"][0][7] = [numel], 1, "bitmap+zstd", len(frame)
    crafted = list(parts)
    crafted[2] = frame
    assert_refused_within_bound(path, build(h, b"".join(crafted) + dense), h, idle_child_rss)


@pytest.mark.parametrize("name", ["torchvision:fasterrcnn_resnet50_fpn", "torchvision:deeplabv3_resnet50",
                                  "torchvision:raft_small", "torchvision:no_such_model", "../../etc/passwd", "os:system"])
def test_model_names_outside_the_allow_list_are_refused(compressed_run, tmp_path, name):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    header["model"]["model"] = name
    expected = "needs code to be imported" if name == "os:system" else "classification model|unknown model"
    expect_error(tmp_path / "named.jcz", build(header, body), expected)


def test_a_torchvision_classifier_is_built_without_weights_then_compared(compressed_run, tmp_path):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    header["model"]["model"] = "torchvision:resnet18"  # allowed, built on the meta device: no download
    expect_error(tmp_path / "named.jcz", build(header, body), "do not match")


def test_non_finite_values_and_duplicate_names_are_refused(compressed_run, tmp_path):
    _, good = compressed_run
    header, body = split(good.read_bytes())
    parts, dense = sections(header, body)
    for value in (float("nan"), float("inf")):
        crafted = list(parts)
        crafted[0] = struct.pack("<f", value) + parts[0][4:]
        expect_error(tmp_path / "nan.jcz", build(header, b"".join(crafted) + dense), "NaN or infinite")
    h = json.loads(json.dumps(header))
    h["de"], h["dl"] = "raw", h["dr"]
    raw = zstandard.ZstdDecompressor().decompress(dense) if header["de"] == "zstd" else dense
    nan_bias = struct.pack("<f", float("nan")) + raw[4:]
    expect_error(tmp_path / "nan.jcz", build(h, b"".join(parts) + nan_bias), "NaN")

    h = json.loads(json.dumps(header))
    h["d"][0][0] = h["c"][0][0]  # a dense tensor named like a compressed one
    expect_error(tmp_path / "dup.jcz", build(h, body), "appears twice")
    h = json.loads(json.dumps(header))
    h["c"][1][0] = h["c"][0][0]
    expect_error(tmp_path / "dup.jcz", build(h, body), "appears twice")


FUZZ_CASES = int(os.environ.get("JOINTCOMP_FUZZ", "600"))  # raise it for a longer fuzz (the note quotes 10,000)


def test_fuzzed_checkpoints_only_raise_checkpoint_error_within_the_bound(compressed_run, tmp_path, idle_child_rss):
    _, good = compressed_run
    data = good.read_bytes()
    header, body = split(data)
    rng = random.Random(1234)
    path = tmp_path / "fuzz.jcz"
    outcomes = {"CheckpointError": 0, "loaded": 0, "other": 0}
    worst = 0.0
    for i in range(FUZZ_CASES):
        if i % 3 == 0:
            case = mutate(data, rng)  # raw damage: the checksum catches it
        elif i % 3 == 1:
            case = resign(mutate(data, rng))  # damage behind a valid checksum
        else:
            case = build(mutate_header(header, rng), body)  # a well-formed but lying header
        path.write_bytes(case)
        outcome, peak = run_in_child(lambda: load_compressed(path))
        outcomes[outcome] += 1
        bound = read_memory_bound(len(case), 4 * MAX_ELEMENTS_PER_FILE_BYTE * len(case))
        worst = max(worst, (peak - idle_child_rss) / bound)
    print(f"fuzz: {outcomes}, worst peak memory {worst:.3f} of the bound")
    assert outcomes["other"] == 0, outcomes
    assert outcomes["CheckpointError"] > FUZZ_CASES * 0.5, outcomes
    assert worst <= 1.0
