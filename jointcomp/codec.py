"""The compressed checkpoint file (.jcz): write, read, inspect.

Layout, little-endian:

    b"JCZ" version(u8) | header length (u32) | zstd(JSON header) | body | CRC32 of all before (u32)

The body holds, per compressed tensor: its codebook (2^b float32), the codes bit-packed at
exactly b bits (zstd'd when that is smaller), and the positions of the non-zeros in the
cheapest of three encodings (bitmap, zstd'd bitmap, zstd'd varint gaps); then every other
parameter and buffer, raw or zstd'd. The header says how long each piece is.

Reading never unpickles and never imports code unless asked (`allow_import=True`); every
length is checked against the file before anything is allocated, and any damage raises
`CheckpointError`.
"""
from __future__ import annotations

import io
import json
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from torch import nn

from .rundir import atomic_write

MAGIC = b"JCZ"
VERSION = 1
MAX_WEIGHTS_PER_FILE_BYTE = 4096  # no real checkpoint expands more; bounds what a file may make us allocate
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
           "bool": torch.bool, "uint8": torch.uint8, "bfloat16": torch.bfloat16, "float64": torch.float64}


class CheckpointError(Exception):
    """A .jcz file that cannot be read: damaged, truncated, not ours, or not allowed."""


@dataclass
class PackedLayer:
    """One compressed weight: which entries are kept, and each one's codebook index."""

    shape: tuple[int, ...]
    bits: int
    codebook: torch.Tensor  # 2^bits float32 values
    mask: torch.Tensor  # bool, shape `shape`
    codes: torch.Tensor  # int, one per kept entry in flat order

    def weight(self) -> torch.Tensor:
        out = torch.zeros(self.mask.numel(), dtype=torch.float32)
        out[self.mask.flatten()] = self.codebook[self.codes.long()]
        return out.view(self.shape)


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
    c = codes.cpu().numpy().astype(np.uint16)
    planes = ((c[:, None] >> np.arange(bits, dtype=np.uint16)) & 1).astype(np.uint8)
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_codes(data: bytes, count: int, bits: int) -> torch.Tensor:
    if len(data) != (count * bits + 7) // 8:
        raise CheckpointError("codes section has the wrong length")
    planes = np.unpackbits(np.frombuffer(data, np.uint8), count=count * bits, bitorder="little")
    values = planes.reshape(count, bits).astype(np.int64) @ (1 << np.arange(bits, dtype=np.int64))
    return torch.from_numpy(values)


def _varint(values: np.ndarray) -> bytes:
    v = values.astype(np.uint64)
    length = np.maximum(1, (np.floor(np.log2(np.maximum(v, 1))).astype(np.int64) // 7) + 1)
    k = np.arange(10, dtype=np.uint64)
    groups = ((v[:, None] >> (7 * k)) & 0x7F).astype(np.uint8)
    more = (k[None, :] < (length[:, None] - 1)).astype(np.uint8) << 7
    return (groups | more)[k[None, :] < length[:, None]].tobytes()


def _unvarint(data: bytes, count: int) -> np.ndarray:
    b = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(b < 0x80)
    if len(ends) != count or (count and ends[-1] != len(b) - 1):
        raise CheckpointError("positions section is malformed")
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    group = np.concatenate([[0], np.cumsum(b[:-1] < 0x80)]).astype(np.int64)
    k = np.arange(len(b)) - starts[group]
    if len(k) and k.max() >= 5:
        raise CheckpointError("positions section has an oversized gap")
    return np.add.reduceat((b & 0x7F).astype(np.int64) << (7 * k), starts) if count else np.zeros(0, np.int64)


def encode_positions(mask: torch.Tensor) -> tuple[str, bytes]:
    """The cheapest of: bitmap, zstd'd bitmap, zstd'd varint gaps between positions."""
    flat = mask.flatten().cpu().numpy()
    bitmap = np.packbits(flat, bitorder="little").tobytes()
    positions = np.flatnonzero(flat)
    gaps = np.diff(positions, prepend=-1) - 1
    options = {
        "bitmap": bitmap,
        "bitmap+zstd": _zstd(bitmap),
        "gaps+zstd": _zstd(_varint(gaps)),
    }
    name = min(options, key=lambda k: len(options[k]))
    return name, options[name]


def decode_positions(encoding: str, data: bytes, numel: int, nnz: int) -> torch.Tensor:
    if encoding in ("bitmap", "bitmap+zstd"):
        raw = _unzstd(data, (numel + 7) // 8) if encoding == "bitmap+zstd" else data
        if len(raw) != (numel + 7) // 8:
            raise CheckpointError("bitmap has the wrong length")
        flat = np.unpackbits(np.frombuffer(raw, np.uint8), count=numel, bitorder="little").astype(bool)
    elif encoding == "gaps+zstd":
        gaps = _unvarint(_unzstd(data, 5 * nnz), nnz)
        positions = np.cumsum(gaps + 1) - 1
        if nnz and (positions[-1] >= numel):
            raise CheckpointError("positions run past the end of the tensor")
        flat = np.zeros(numel, dtype=bool)
        flat[positions] = True
    else:
        raise CheckpointError(f"unknown positions encoding {encoding!r}")
    if int(flat.sum()) != nnz:
        raise CheckpointError("positions disagree with the number of non-zeros")
    return torch.from_numpy(flat)


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=19, write_content_size=True, write_checksum=False).compress(data)


def _unzstd(data: bytes, limit: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=max(limit, 1))
    except zstandard.ZstdError as err:
        raise CheckpointError(f"compressed section is damaged ({err})") from err
    if len(out) > limit:
        raise CheckpointError("compressed section expands beyond its declared size")
    return out


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's whole state dict stored densely at 32 bits per value."""
    return 4 * sum(t.numel() for t in model.state_dict().values())


# --- writing ----------------------------------------------------------------------------
def encode(model: nn.Module, layers: dict[str, PackedLayer], spec: dict[str, Any] | None = None,
           dense_dtype: str = "float32") -> bytes:
    """The bytes of a .jcz file for `model` whose weights `layers` are compressed."""
    if dense_dtype not in ("float32", "float16"):
        raise ValueError("dense_dtype must be 'float32' or 'float16'")
    body = io.BytesIO()
    compressed = []
    for name, layer in layers.items():
        book = layer.codebook.detach().cpu().float().contiguous()
        if len(book) != 2**layer.bits:
            raise ValueError(f"{name}: codebook has {len(book)} entries, expected {2 ** layer.bits}")
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
        t = tensor.detach().cpu()
        if t.is_floating_point():
            t = t.to(getattr(torch, dense_dtype))
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"{name}: cannot store dtype {dtype}")
        dense.append([name, dtype, list(t.shape)])
        dense_buf.write(raw)
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
                    spec: dict[str, Any] | None = None, dense_dtype: str = "float32") -> int:
    """Write a .jcz file atomically; returns its size in bytes."""
    data = encode(model, layers, spec, dense_dtype)
    atomic_write(path, data)
    return len(data)


# --- reading ----------------------------------------------------------------------------
@dataclass
class _Parsed:
    header: dict[str, Any]
    layers: dict[str, PackedLayer]
    dense: dict[str, torch.Tensor]
    report: Report


def _parse(data: bytes) -> _Parsed:
    if len(data) < 12 or data[:3] != MAGIC:
        raise CheckpointError("not a jointcomp checkpoint (bad magic)")
    if data[3] != VERSION:
        raise CheckpointError(f"format version {data[3]} is not supported (this jointcomp reads {VERSION})")
    (crc,) = struct.unpack("<I", data[-4:])
    if zlib.crc32(data[:-4]) != crc:
        raise CheckpointError("checksum mismatch: the file is damaged or truncated")
    (header_len,) = struct.unpack("<I", data[4:8])
    if header_len > len(data) - 12:
        raise CheckpointError("header length runs past the end of the file")
    header_raw = _unzstd(data[8 : 8 + header_len], 64 * len(data))
    header = json.loads(header_raw)
    budget = MAX_WEIGHTS_PER_FILE_BYTE * len(data)  # elements the file may ask us to allocate
    pos, end = 8 + header_len, len(data) - 4

    def take(n: int) -> bytes:
        nonlocal pos
        if not isinstance(n, int) or n < 0 or pos + n > end:
            raise CheckpointError("a section runs past the end of the file")
        chunk = data[pos : pos + n]
        pos += n
        return chunk

    def numel_of(shape: list) -> int:
        nonlocal budget
        if not isinstance(shape, list) or not all(isinstance(d, int) and 0 <= d for d in shape):
            raise CheckpointError("bad tensor shape")
        n = int(np.prod(shape, dtype=object)) if shape else 1
        budget -= n
        if budget < 0:
            raise CheckpointError("tensor sizes are larger than this file can justify")
        return n

    layers, rows = {}, []
    for name, shape, bits, nnz, codes_enc, codes_len, pos_enc, pos_len in header["c"]:
        numel = numel_of(shape)
        if not (isinstance(bits, int) and 1 <= bits <= 8 and isinstance(nnz, int) and 0 <= nnz <= numel):
            raise CheckpointError(f"{name}: bad bitwidth or non-zero count")
        book = torch.frombuffer(bytearray(take(4 * 2**bits)), dtype=torch.float32)
        codes_raw = take(codes_len)
        if codes_enc == "zstd":
            codes_raw = _unzstd(codes_raw, (nnz * bits + 7) // 8)
        elif codes_enc != "raw":
            raise CheckpointError(f"{name}: unknown codes encoding")
        codes = unpack_codes(codes_raw, nnz, bits)
        mask = decode_positions(pos_enc, take(pos_len), numel, nnz).view(shape)
        layers[name] = PackedLayer(tuple(shape), bits, book, mask, codes)
        rows.append(LayerBytes(name, tuple(shape), nnz, bits, codes_len, pos_len, pos_enc, 4 * 2**bits))

    dense_payload = take(header["dl"])
    expected = 0
    for name, dtype, shape in header["d"]:
        if dtype not in _DTYPES:
            raise CheckpointError(f"{name}: unknown dtype {dtype!r}")
        expected += numel_of(shape) * torch.empty(0, dtype=_DTYPES[dtype]).element_size()
    if header["dr"] != expected:
        raise CheckpointError("dense section size disagrees with its tensors")
    if header["de"] == "zstd":
        dense_payload = _unzstd(dense_payload, expected)
    elif header["de"] != "raw":
        raise CheckpointError("unknown dense encoding")
    if len(dense_payload) != expected:
        raise CheckpointError("dense section has the wrong length")
    if pos != end:
        raise CheckpointError("unexpected bytes after the last section")
    dense, offset = {}, 0
    for name, dtype, shape in header["d"]:
        t = torch.empty(shape, dtype=_DTYPES[dtype])
        n = t.numel() * t.element_size()
        if n:
            t.view(-1).view(torch.uint8).copy_(torch.frombuffer(bytearray(dense_payload[offset : offset + n]), dtype=torch.uint8))
        dense[name] = t
        offset += n

    fp32 = 4 * (sum(layer.mask.numel() for layer in layers.values()) + sum(t.numel() for t in dense.values()))
    report = Report(
        rows, header["dl"], 8 + header_len, len(data), fp32,
        sum(r.bits * r.nnz for r in rows), sum(layer.mask.numel() for layer in layers.values()), header.get("model"),
    )
    return _Parsed(header, layers, dense, report)


def _read(path: str | Path) -> _Parsed:
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from err
    try:
        return _parse(data)
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError, struct.error) as err:
        raise CheckpointError(f"{path}: not a valid jointcomp checkpoint ({type(err).__name__})") from None


def inspect(path: str | Path) -> Report:
    """Per-layer byte breakdown and totals of a .jcz file."""
    return _read(path).report


def load_compressed(path: str | Path, model: nn.Module | None = None, allow_import: bool = False) -> nn.Module:
    """Rebuild the model from a .jcz file, with the compressed weights decoded exactly.

    Built-in and torchvision models are rebuilt from the header; a `module:factory` model
    is imported only with `allow_import=True` (or pass your own `model` instance).
    """
    parsed = _read(path)
    state = {name: layer.weight() for name, layer in parsed.layers.items()}
    state.update(parsed.dense)
    if model is None:
        model = _model_from_spec(path, parsed.header.get("model"), allow_import, state)
    own = model.state_dict()
    for name, t in state.items():
        if name in own and own[name].is_floating_point() and t.is_floating_point():
            state[name] = t.to(own[name].dtype)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: does not fit this model ({str(err).splitlines()[0]})") from None
    return model.eval()


def _model_from_spec(path, spec: Any, allow_import: bool, state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the model the header names: first without memory (meta device), so that a
    header describing a model larger than the file's tensors is refused before allocating."""
    from .models import BUILTIN, build_model

    if not isinstance(spec, dict) or not isinstance(spec.get("model"), str):
        raise CheckpointError(f"{path}: holds no model description; pass the model instance to load it into")
    name = spec["model"]
    if ":" in name and not name.startswith("torchvision:") and not allow_import:
        raise CheckpointError(f"{path}: model {name!r} needs code to be imported; pass allow_import=True if you trust it")
    if name not in BUILTIN and ":" not in name:
        raise CheckpointError(f"{path}: unknown model {name!r}")
    try:
        shape, classes = tuple(int(d) for d in spec["input_shape"]), int(spec["num_classes"])
        with torch.device("meta"):
            model = build_model(name, shape, classes)
    except (ValueError, KeyError, TypeError, RuntimeError, OverflowError) as err:
        raise CheckpointError(f"{path}: cannot rebuild model {name!r} ({err})") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if expected != {k: tuple(v.shape) for k, v in state.items()}:
        raise CheckpointError(f"{path}: the tensors do not match model {name!r}")
    return model.to_empty(device="cpu")


def format_report(report: Report) -> str:
    """The `inspect` table: one line per compressed layer, then labelled totals."""
    lines = [f"{'layer':<24}{'shape':<18}{'nnz':>9}{'bits':>5}{'codes B':>9}{'positions B':>13} {'(encoding)':<14}{'codebook B':>11}"]
    for r in report.layers:
        shape = "x".join(map(str, r.shape))
        lines.append(f"{r.name:<24}{shape:<18}{r.nnz:>9}{r.bits:>5}{r.codes_bytes:>9}{r.positions_bytes:>13} "
                     f"{'(' + r.positions_encoding + ')':<14}{r.codebook_bytes:>11}")
    lines += [
        f"other parameters and buffers: {report.dense_bytes} B",
        f"header: {report.header_bytes} B",
        f"file size: {report.file_bytes} B",
        f"dense fp32 size: {report.fp32_bytes} B",
        f"ratio on file bytes: {report.file_ratio:.1f}x",
        f"paper-accounting size: {report.paper_bits} bits = sum of bits x non-zeros "
        f"(ratio {report.paper_ratio:.1f}x against fp32 of the compressed weights)",
    ]
    return "\n".join(lines)
