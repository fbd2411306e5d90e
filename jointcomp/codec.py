"""The compressed checkpoint file (.jcz): write, read, inspect.

Layout, little-endian:

    b"JCZ" version(u8) | header length (u32) | zstd(JSON header) | body | CRC32 of all before (u32)

The body holds, per compressed tensor: its codebook (2^b float32), the codes bit-packed at
exactly b bits (zstd'd when that is smaller), and the positions of the non-zeros in the
cheapest of three encodings (bitmap, zstd'd bitmap, zstd'd varint gaps); then every other
tensor of the state dict in its own dtype, raw or zstd'd. The header says how long each
piece is.

Reading is safe on hostile files. It never unpickles and never imports code unless asked
(`allow_import=True`). The header is checked whole (types, unique names, section lengths
that add up to the body, element counts the file can justify) before any tensor is
decoded; every zstd section is stream-decompressed with a cap known beforehand; any damage
raises `CheckpointError`. Memory: reading a file of N bytes whose header declares tensors
of S bytes in all (as float32 for compressed weights) allocates at most
`read_memory_bound(N, S)`, and S is refused above `MAX_ELEMENTS_PER_FILE_BYTE` elements
per file byte before anything is allocated.
"""
from __future__ import annotations

import io
import json
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

from .budget import LayerBounds, MeasuredAccounting, Shipped
from .solvers import dequantize
from .rundir import atomic_write

MAGIC = b"JCZ"
VERSION = 1
PREAMBLE_BYTES = 8  # magic, version, header length
CRC_BYTES = 4
CODEBOOK_VALUE_BYTES = 4  # float32 centres
MAX_ELEMENTS_PER_FILE_BYTE = 4096  # no real checkpoint expands more; bounds what a file may make us allocate
HEADER_EXPANSION = 16  # the JSON header is at most this many times the file's size (+64 KiB)
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64, torch.complex128,
    torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool,
)}


def read_memory_bound(file_bytes: int, tensor_bytes: int) -> int:
    """The most memory (bytes) that reading a file may allocate: see the module docstring."""
    return 64 * file_bytes + 4 * tensor_bytes + 32 * 2**20


class CheckpointError(Exception):
    """A .jcz file that cannot be read: damaged, truncated, not ours, or not allowed."""


@dataclass
class PackedLayer:
    """One compressed weight: which entries are kept, and each one's codebook index."""

    shape: tuple[int, ...]
    bits: int
    codebook: torch.Tensor  # 2^bits float32 values
    mask: torch.Tensor  # bool, shape `shape`
    codes: torch.Tensor  # integer, one per kept entry in flat order

    def weight(self) -> torch.Tensor:
        return dequantize(self.mask.reshape(self.shape), self.codebook, self.codes)


@dataclass
class LayerBytes:
    name: str
    shape: tuple[int, ...]
    nnz: int
    bits: int
    codes_bytes: int
    positions_bytes: int
    positions_encoding: str
    codebook_bytes: int


@dataclass
class Report:
    """What a .jcz file holds, in bytes."""

    layers: list[LayerBytes]
    dense_bytes: int  # the other parameters and buffers
    header_bytes: int
    file_bytes: int
    fp32_bytes: int  # the same model as a dense fp32 state dict
    paper_bits: int  # sum of bits x non-zeros
    compressible_numel: int
    model: dict[str, Any] | None

    @property
    def file_ratio(self) -> float:
        return self.fp32_bytes / self.file_bytes

    @property
    def paper_ratio(self) -> float:
        return 32 * self.compressible_numel / max(self.paper_bits, 1)


# --- bit-level encodings ----------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Codes < 2^bits packed at exactly `bits` bits each."""
    c = codes.cpu().numpy().astype(np.uint8)
    planes = np.unpackbits(c[:, None], axis=1, count=bits, bitorder="little")
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> torch.Tensor:
    """The inverse of `pack_codes`, as uint8 (one byte a code: bits <= 8)."""
    if len(data) != (count * bits + 7) // 8:
        raise CheckpointError("codes section has the wrong length")
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
    return torch.from_numpy(np.packbits(planes.reshape(count, bits), axis=1, bitorder="little").reshape(count))


def varint_bytes(values: np.ndarray) -> bytes:
    """Non-negative integers as LEB128 varints (7 bits a byte, low first, high bit: more follows)."""
    v = values.astype(np.uint64)
    length = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) // 7) + 1)
    k = np.arange(10, dtype=np.uint64)
    groups = ((v[:, None] >> (7 * k)) & 0x7F).astype(np.uint8)
    more = (k[None, :] < (length[:, None] - 1)).astype(np.uint8) << 7
    return (groups | more)[k[None, :] < length[:, None]].tobytes()


def _unvarint(data: bytes, count: int, below: int) -> np.ndarray:
    """`count` varints, each < `below`; a few bytes of scratch per value, in int64."""
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != count or (count and ends[-1] != len(b) - 1) or (not count and len(b)):
        raise CheckpointError("positions section is malformed")
    lengths = np.diff(ends, prepend=-1)
    if count and lengths.max() > max(1, math.ceil(max(below, 1).bit_length() / 7)):
        raise CheckpointError("positions section has an oversized gap")
    values = np.zeros(count, np.int64)
    for k in range(int(lengths.max()) if count else 0):
        has = lengths > k
        values[has] |= (b[ends[has] - lengths[has] + 1 + k] & 0x7F).astype(np.int64) << (7 * k)
    return values


def plain_positions(mask: torch.Tensor) -> tuple[bytes, bytes]:
    """The two plain layouts of a mask's kept positions, in flat order: a bitmap (low bit
    first) and the LEB128 gaps between kept weights. The file compresses them further; the
    C export stores one as it is."""
    flat = mask.flatten().cpu().numpy()
    return np.packbits(flat, bitorder="little").tobytes(), varint_bytes(np.diff(np.flatnonzero(flat), prepend=-1) - 1)


def encode_positions(mask: torch.Tensor) -> tuple[str, bytes]:
    """The cheapest of: bitmap, zstd'd bitmap, zstd'd varint gaps between positions."""
    bitmap, gaps = plain_positions(mask)
    options = {"bitmap": bitmap, "bitmap+zstd": _zstd(bitmap), "gaps+zstd": _zstd(gaps)}
    name = min(options, key=lambda k: len(options[k]))
    return name, options[name]


def _gap_bytes_limit(numel: int, nnz: int) -> int:
    """Most bytes minimal varints of `nnz` gaps inside `numel` entries can take: one byte a
    gap, plus at most one more per 128 entries skipped."""
    return nnz + numel // 128 + 1


def decode_positions(encoding: str, data: bytes, numel: int, nnz: int) -> torch.Tensor:
    if encoding in ("bitmap", "bitmap+zstd"):
        raw = _unzstd(data, (numel + 7) // 8) if encoding == "bitmap+zstd" else data
        if len(raw) != (numel + 7) // 8:
            raise CheckpointError("bitmap has the wrong length")
        flat = np.unpackbits(np.frombuffer(raw, np.uint8), count=numel, bitorder="little").view(bool)
    elif encoding == "gaps+zstd":
        positions = _unvarint(_unzstd(data, _gap_bytes_limit(numel, nnz)), nnz, numel)
        positions += 1
        np.cumsum(positions, out=positions)
        positions -= 1
        if nnz and (positions[-1] >= numel):
            raise CheckpointError("positions run past the end of the tensor")
        flat = np.zeros(numel, dtype=bool)
        flat[positions] = True
    else:
        raise CheckpointError(f"unknown positions encoding {encoding!r}")
    if int(np.count_nonzero(flat)) != nnz:
        raise CheckpointError("positions disagree with the number of non-zeros")
    return torch.from_numpy(flat)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=True, write_checksum=False).compress(data)


def _unzstd(data: bytes, limit: int) -> bytes:
    """Decompress one zstd frame of at most `limit` bytes, whatever size the frame claims:
    a stream read with a cap, so a bomb costs `limit` bytes, not what it expands to."""
    try:
        out = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False).read(limit + 1)
    except zstandard.ZstdError as err:
        raise CheckpointError(f"compressed section is damaged ({err})") from None
    if len(out) > limit:
        raise CheckpointError("compressed section expands beyond its declared size")
    return out


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's whole state dict stored densely at 32 bits per value."""
    return 4 * sum(t.numel() for t in model.state_dict().values())


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw bytes of any tensor (0-dim and empty ones too), in its own dtype."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


class FileAccounting(MeasuredAccounting):
    """The budget mode in which the target is this file's size: every tensor the file
    stores densely is reserved, each kept weight pays its code and its position, each layer
    its codebook and header entry."""

    description = "bytes of the exported .jcz file"
    LAYER_HEADER_BITS = 8 * 24  # a compressed layer's entry in the JSON header, about
    OVERHEAD_BYTES = 64  # preamble, checksum, dense-section entry and the model description

    def reference_bits(self, model: nn.Module, layers: list[tuple[str, nn.Parameter, LayerBounds]]) -> tuple[float, float]:
        compressed = [w.numel() for _, w, b in layers if not b.dense]
        total = fp32_bytes(model)
        return 8.0 * (total - 4 * sum(compressed) + self.OVERHEAD_BYTES), 8.0 * total

    def position_cost(self, density: torch.Tensor) -> torch.Tensor:
        """Entropy of the mask per non-zero (what gap coding approaches), never more than a
        plain bitmap, plus a small margin."""
        d = density.double().clamp(1e-9, 1 - 1e-9)
        entropy = -(d * torch.log2(d) + (1 - d) * torch.log2(1 - d)) / d
        return torch.minimum(entropy, 1 / d) * 1.05 + 0.05

    def layer_bits(self, bits: torch.Tensor, numel: torch.Tensor) -> torch.Tensor:
        return 8.0 * CODEBOOK_VALUE_BYTES * 2.0 ** bits.double() + self.LAYER_HEADER_BITS

    def measure(self, size_bits: float, shipped: Shipped) -> float:
        return 8.0 * shipped.file_bytes()


# --- writing ----------------------------------------------------------------------------
def encode(model: nn.Module, layers: dict[str, PackedLayer], spec: dict[str, Any] | None = None) -> bytes:
    """The bytes of a .jcz file for `model` whose weights `layers` are compressed; every
    other tensor of its state dict is stored exactly, in its own dtype."""
    body = io.BytesIO()
    compressed = []
    for name, layer in layers.items():
        book = layer.codebook.detach().cpu().float().contiguous()
        if len(book) != 2**layer.bits:
            raise ValueError(f"{name}: codebook has {len(book)} entries, expected {2 ** layer.bits}")
        if not bool(torch.isfinite(book).all()):
            raise ValueError(f"{name}: the codebook holds NaN or infinite values; the training diverged")
        codes_raw = pack_codes(layer.codes, layer.bits)
        codes_z = _zstd(codes_raw)
        codes_enc, codes = ("zstd", codes_z) if len(codes_z) < len(codes_raw) else ("raw", codes_raw)
        pos_enc, positions = encode_positions(layer.mask)
        body.write(book.numpy().tobytes())
        body.write(codes)
        body.write(positions)
        nnz = int(layer.mask.sum())
        compressed.append([name, list(layer.shape), layer.bits, nnz, codes_enc, len(codes), pos_enc, len(positions)])

    dense = []
    dense_buf = io.BytesIO()
    for name, tensor in model.state_dict().items():
        if name in layers:
            continue
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"{name}: cannot store dtype {dtype}")
        if tensor.is_floating_point() and bool(tensor.isnan().any()):
            raise ValueError(f"{name} holds NaN values; the training diverged")
        dense.append([name, dtype, list(tensor.shape)])
        dense_buf.write(tensor_bytes(tensor))
    dense_raw = dense_buf.getvalue()
    dense_z = _zstd(dense_raw)
    dense_enc, dense_bytes = ("zstd", dense_z) if len(dense_z) < len(dense_raw) else ("raw", dense_raw)
    body.write(dense_bytes)

    header = {"v": VERSION, "model": spec, "c": compressed, "d": dense, "de": dense_enc,
              "dl": len(dense_bytes), "dr": len(dense_raw)}
    header_z = _zstd(json.dumps(header, separators=(",", ":")).encode())
    head = MAGIC + bytes([VERSION]) + struct.pack("<I", len(header_z)) + header_z + body.getvalue()
    return head + struct.pack("<I", zlib.crc32(head))


def save_compressed(path: str | Path, model: nn.Module, layers: dict[str, PackedLayer],
                    spec: dict[str, Any] | None = None) -> int:
    """Write a .jcz file atomically; returns its size in bytes."""
    data = encode(model, layers, spec)
    atomic_write(path, data)
    return len(data)


# --- reading ----------------------------------------------------------------------------
@dataclass
class _CompressedEntry:
    name: str
    shape: tuple[int, ...]
    bits: int
    nnz: int
    codes_enc: str
    codes: memoryview
    pos_enc: str
    positions: memoryview
    codebook: memoryview

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class _Layout:
    """A checked header and the body cut into its sections; nothing decoded yet."""

    data: bytes
    header: dict[str, Any]
    compressed: list[_CompressedEntry]
    dense: list[tuple[str, torch.dtype, tuple[int, ...]]]
    dense_payload: memoryview
    header_bytes: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {**{e.name: e.shape for e in self.compressed}, **{n: s for n, _, s in self.dense}}

    def report(self) -> Report:
        rows = [LayerBytes(e.name, e.shape, e.nnz, e.bits, len(e.codes), len(e.positions), e.pos_enc, len(e.codebook))
                for e in self.compressed]
        numel = sum(e.numel for e in self.compressed)
        fp32 = 4 * (numel + sum(math.prod(s) for _, _, s in self.dense))
        return Report(rows, len(self.dense_payload), self.header_bytes, len(self.data), fp32,
                      sum(r.bits * r.nnz for r in rows), numel, self.header.get("model"))


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 8 or not all(_is_int(d) and d >= 0 for d in value):
        raise CheckpointError(f"{name}: bad tensor shape")
    return tuple(value)


def _layout(data: bytes) -> _Layout:
    """Check the file's frame and header and cut the body into sections. Allocates nothing
    in proportion to what the header claims."""
    if len(data) < PREAMBLE_BYTES + CRC_BYTES or data[:3] != MAGIC:
        raise CheckpointError("not a jointcomp checkpoint (bad magic)")
    if data[3] != VERSION:
        raise CheckpointError(f"format version {data[3]} is not supported (this jointcomp reads {VERSION})")
    (crc,) = struct.unpack("<I", data[-CRC_BYTES:])
    if zlib.crc32(memoryview(data)[:-CRC_BYTES]) != crc:
        raise CheckpointError("checksum mismatch: the file is damaged or truncated")
    (header_len,) = struct.unpack("<I", data[4:8])
    if header_len > len(data) - PREAMBLE_BYTES - CRC_BYTES:
        raise CheckpointError("header length runs past the end of the file")
    view = memoryview(data)
    raw = _unzstd(view[PREAMBLE_BYTES : PREAMBLE_BYTES + header_len], HEADER_EXPANSION * len(data) + 2**16)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise CheckpointError("the header is not valid JSON") from err
    if not isinstance(header, dict) or not isinstance(header.get("c"), list) or not isinstance(header.get("d"), list):
        raise CheckpointError("the header lacks its tensor tables")
    if header.get("de") not in ("raw", "zstd") or not _is_int(header.get("dl")) or not _is_int(header.get("dr")):
        raise CheckpointError("the header's dense section entry is malformed")

    pos, end = PREAMBLE_BYTES + header_len, len(data) - CRC_BYTES

    def take(n: Any, what: str) -> memoryview:
        nonlocal pos
        if not _is_int(n) or n < 0 or pos + n > end:
            raise CheckpointError(f"{what} runs past the end of the file")
        pos += n
        return view[pos - n : pos]

    names: set[str] = set()

    def new_name(name: Any) -> str:
        if not isinstance(name, str) or not name:
            raise CheckpointError("a tensor has no name")
        if name in names:
            raise CheckpointError(f"tensor {name!r} appears twice")
        names.add(name)
        return name

    elements = 0  # what the file would make us allocate, checked against its size as we go
    limit = MAX_ELEMENTS_PER_FILE_BYTE * len(data)

    def count(shape: tuple[int, ...]) -> int:
        nonlocal elements
        elements += math.prod(shape)
        if elements > limit:
            raise CheckpointError("tensor sizes are larger than this file can justify")
        return math.prod(shape)

    compressed = []
    for row in header["c"]:
        if not isinstance(row, list) or len(row) != 8:
            raise CheckpointError("a compressed-tensor entry is malformed")
        name, shape, bits, nnz, codes_enc, codes_len, pos_enc, pos_len = row
        name = new_name(name)
        shape = _shape(shape, name)
        numel = count(shape)
        if not (_is_int(bits) and 1 <= bits <= 8 and _is_int(nnz) and 0 <= nnz <= numel):
            raise CheckpointError(f"{name}: bad bitwidth or non-zero count")
        if codes_enc not in ("raw", "zstd") or pos_enc not in ("bitmap", "bitmap+zstd", "gaps+zstd"):
            raise CheckpointError(f"{name}: unknown section encoding")
        book = take(CODEBOOK_VALUE_BYTES * 2**bits, f"{name}'s codebook")
        compressed.append(_CompressedEntry(
            name, shape, bits, nnz, codes_enc, take(codes_len, f"{name}'s codes"),
            pos_enc, take(pos_len, f"{name}'s positions"), book,
        ))

    dense, expected = [], 0
    for row in header["d"]:
        if not isinstance(row, list) or len(row) != 3:
            raise CheckpointError("a dense-tensor entry is malformed")
        name, dtype, shape = row
        name = new_name(name)
        if dtype not in DTYPES:
            raise CheckpointError(f"{name}: unknown dtype {dtype!r}")
        shape = _shape(shape, name)
        expected += count(shape) * DTYPES[dtype].itemsize
        dense.append((name, DTYPES[dtype], shape))
    if header["dr"] != expected:
        raise CheckpointError("dense section size disagrees with its tensors")
    payload = take(header["dl"], "the dense section")
    if pos != end:
        raise CheckpointError("unexpected bytes after the last section")
    return _Layout(data, header, compressed, dense, payload, PREAMBLE_BYTES + header_len)


def _decode_layer(e: _CompressedEntry) -> PackedLayer:
    book = torch.from_numpy(np.frombuffer(e.codebook, np.float32).copy())
    if not bool(torch.isfinite(book).all()):
        raise CheckpointError(f"{e.name}: the codebook holds NaN or infinite values")
    codes_raw = _unzstd(e.codes, (e.nnz * e.bits + 7) // 8) if e.codes_enc == "zstd" else e.codes
    codes = unpack_codes(codes_raw, e.nnz, e.bits)
    mask = decode_positions(e.pos_enc, e.positions, e.numel, e.nnz).view(e.shape)
    return PackedLayer(e.shape, e.bits, book, mask, codes)


def _decode_dense(layout: _Layout) -> dict[str, torch.Tensor]:
    expected = layout.header["dr"]
    payload = _unzstd(layout.dense_payload, expected) if layout.header["de"] == "zstd" else layout.dense_payload
    if len(payload) != expected:
        raise CheckpointError("dense section has the wrong length")
    dense, offset = {}, 0
    for name, dtype, shape in layout.dense:
        n = math.prod(shape) * dtype.itemsize
        if n:
            t = torch.from_numpy(np.frombuffer(payload, np.uint8, count=n, offset=offset).copy()).view(dtype).view(shape)
        else:
            t = torch.empty(shape, dtype=dtype)
        if t.is_floating_point() and bool(t.isnan().any()):
            raise CheckpointError(f"{name} holds NaN values")
        dense[name] = t
        offset += n
    return dense


def _layout_of(path: str | Path) -> _Layout:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    return _guarded(path, _layout, data)


def _guarded(path: str | Path, fn, *args):
    """Run a reading step, turning anything a damaged file can provoke into CheckpointError."""
    try:
        return fn(*args)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError, struct.error) as err:
        raise CheckpointError(f"{path}: not a valid jointcomp checkpoint ({type(err).__name__})") from None


def inspect_file(path: str | Path) -> Report:
    """Per-layer byte breakdown and totals of a .jcz file (every section is decoded and
    checked, so a file that inspects cleanly also loads)."""
    layout = _layout_of(path)
    for entry in layout.compressed:
        _guarded(path, _decode_layer, entry)
    _guarded(path, _decode_dense, layout)
    return layout.report()


def load_compressed(path: str | Path, model: nn.Module | None = None, allow_import: bool = False) -> nn.Module:
    """Rebuild the model from a .jcz file, with the compressed weights decoded exactly.

    Built-in and torchvision classification models are rebuilt from the header; a
    `module:factory` model is imported only with `allow_import=True` (or pass your own
    `model` instance).
    """
    return load_packed(path, model, allow_import)[0]


def load_packed(path: str | Path, model: nn.Module | None = None,
                allow_import: bool = False) -> tuple[nn.Module, dict[str, PackedLayer], dict[str, Any] | None]:
    """`load_compressed`, plus each compressed weight in its packed form (what a runtime
    that decodes weights as it uses them needs) and the file's model description."""
    layout = _layout_of(path)
    if model is None:
        model = _model_from_spec(path, layout.header.get("model"), allow_import, layout.shapes)
    packed = {entry.name: _guarded(path, _decode_layer, entry) for entry in layout.compressed}
    state = {name: layer.weight() for name, layer in packed.items()}
    state.update(_guarded(path, _decode_dense, layout))
    own = model.state_dict()
    for name, t in state.items():
        if name in own and own[name].is_floating_point() and t.is_floating_point():
            state[name] = t.to(own[name].dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit this model ({str(err).splitlines()[0]})") from None
    spec = layout.header.get("model")
    return model.eval(), packed, spec if isinstance(spec, dict) else None


def _model_from_spec(path, spec: Any, allow_import: bool, shapes: dict[str, tuple[int, ...]]) -> nn.Module:
    """Build the model the header names: first without memory (meta device) and without
    any pretrained weights, so that a header describing another model is refused before
    anything is allocated or fetched."""
    from .models import check_model_name, build_model

    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise CheckpointError(f"{path}: holds no model description; pass the model instance to load it into")
    name = spec["model"]
    try:
        kind = check_model_name(name)
    except ValueError as err:
        raise CheckpointError(f"{path}: {err}") from None
    if kind == "import" and not allow_import:
        raise CheckpointError(f"{path}: model {name!r} needs code to be imported; pass allow_import=True if you trust it")
    input_shape, classes = _shape(spec.get("input_shape"), f"{path}: input_shape"), spec.get("num_classes")
    if not _is_int(classes) or classes < 1:
        raise CheckpointError(f"{path}: bad number of classes")
    try:
        with torch.device("meta"):
            model = build_model(name, input_shape, classes)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    except Exception as err:  # whatever a model's constructor raises on nonsense arguments
        raise CheckpointError(f"{path}: cannot rebuild model {name!r} ({type(err).__name__})") from None
    if expected != shapes:
        raise CheckpointError(f"{path}: the tensors do not match model {name!r}")
    return model.to_empty(device="cpu")

