"""Load a qwen2 GGUF file: validated header, plain metadata, memory-mapped tensors, ModelConfig.

The header is parsed here with a bounds check before every read, so a malformed file ends in a
`GGUFLoadError` naming the file and field -- never a raw traceback, a hang, or an allocation
larger than the file (every count is checked against the bytes left before anything is built;
metadata lists of Python objects cost at most a small multiple of the bytes they are read from,
which tests/test_gguf_fuzz.py bounds with tracemalloc). (gguf's GGUFReader trusts the header's counts and builds one numpy view per
vocabulary string, ~7 s for this model; this parser takes ~0.3 s. tests/test_gguf_loader.py checks
it against GGUFReader field by field.) Tensor data stay in the OS page cache: each
`TensorInfo.data` is a read-only uint8 view of the file's mmap.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from gpu_worker.model import errors as E
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.gguf_config import check_tensor_shapes, config_from_metadata
from gpu_worker.model.quant_types import SUPPORTED_TYPES, quant_spec, type_name

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4            # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 3     # arrays of arrays are legal GGUF; deeper nesting is treated as garbage
DEFAULT_ALIGNMENT = 32
# A count or length needing more than this is corrupt whatever the file's size (SizeOverflow);
# less than that but past the end of the file is a truncation (Truncated).
PLAUSIBLE_FILE_BYTES = 1 << 40

_SCALARS: dict[int, tuple[str, int]] = {   # value type -> (struct format, size)
    VType.UINT8: ("<B", 1), VType.INT8: ("<b", 1), VType.UINT16: ("<H", 2), VType.INT16: ("<h", 2),
    VType.UINT32: ("<I", 4), VType.INT32: ("<i", 4), VType.FLOAT32: ("<f", 4), VType.BOOL: ("<?", 1),
    VType.UINT64: ("<Q", 8), VType.INT64: ("<q", 8), VType.FLOAT64: ("<d", 8),
}
_MIN_VALUE_BYTES = {**{t: s for t, (_, s) in _SCALARS.items()}, VType.STRING: 8, VType.ARRAY: 12}


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor: `shape` in numpy order (rows, cols) = (out_features, in_features), or (n,).

    `data` is the raw bytes, a read-only uint8 view of the mapped file # [nbytes]
    """

    name: str
    qtype: QType
    shape: tuple[int, ...]
    data: np.ndarray
    nbytes: int

    def __post_init__(self) -> None:
        if self.data.dtype != np.uint8 or self.data.ndim != 1 or self.data.size != self.nbytes:
            raise ValueError(f"{self.name}: data must be a flat uint8 array of {self.nbytes} bytes")
        if not self.shape or any(d <= 0 for d in self.shape):
            raise ValueError(f"{self.name}: bad shape {self.shape}")

    @property
    def num_rows(self) -> int:
        return int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1

    @property
    def num_cols(self) -> int:
        return self.shape[-1]

    @property
    def row_nbytes(self) -> int:
        return quant_spec(self.qtype).row_nbytes(self.num_cols)

    def rows_view(self) -> np.ndarray:
        """The raw bytes as # [num_rows, row_nbytes] uint8."""
        return self.data.reshape(self.num_rows, self.row_nbytes)


@dataclass(eq=False)
class GGUFModel:
    """An opened GGUF file. Use as a context manager or call close()."""

    path: Path
    version: int
    config: ModelConfig
    metadata: dict[str, Any]
    # key -> (GGUFValueType, array item GGUFValueType or None): lets convert/synthetic copy keys exactly
    metadata_types: dict[str, tuple[int, int | None]]
    tensors: dict[str, TensorInfo]
    alignment: int
    data_offset: int
    file_size: int
    _mmap: mmap.mmap | None = field(default=None, repr=False)

    @property
    def lm_head(self) -> TensorInfo:
        """output.weight, or token_embd.weight when the file ties them (config.tied_embeddings)."""
        return self.tensors["token_embd.weight" if self.config.tied_embeddings else "output.weight"]

    def close(self) -> None:
        """Drop the tensors and unmap the file (the map lives on while a caller still holds views)."""
        self.tensors = {}
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass    # views still exported; freed with the last of them
            self._mmap = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HeaderParser:
    """Sequential reader over the mapped file that checks bounds before every read."""

    def __init__(self, path: str, buf: mmap.mmap, size: int) -> None:
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def need(self, nbytes: int, what: str) -> None:
        if nbytes > PLAUSIBLE_FILE_BYTES:
            raise E.SizeOverflow(self.path, what, f"needs {nbytes} bytes, file has {self.size}")
        if self.pos + nbytes > self.size:
            raise E.Truncated(self.path, what, f"needs {nbytes} bytes at offset {self.pos}, "
                                               f"file ends at {self.size}")

    def scalar(self, vtype: int, what: str) -> Any:
        fmt, nbytes = _SCALARS[vtype]
        self.need(nbytes, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += nbytes
        return value

    def string(self, what: str) -> str:
        nbytes = self.scalar(VType.UINT64, what + " (length)")
        self.need(nbytes, what)
        raw = self.buf[self.pos:self.pos + nbytes]
        self.pos += nbytes
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise E.InvalidValue(self.path, what, f"not UTF-8 ({exc.reason})") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == VType.STRING:
            return self.string(what)
        if vtype == VType.ARRAY and depth < MAX_ARRAY_DEPTH:
            return self.array(what, depth)
        raise E.InvalidValue(self.path, what, f"unknown or too deeply nested value type {vtype}")

    def array(self, what: str, depth: int) -> list[Any]:
        item_type = self.scalar(VType.UINT32, what + " (array item type)")
        count = self.scalar(VType.UINT64, what + " (array length)")
        if item_type not in _MIN_VALUE_BYTES:
            raise E.InvalidValue(self.path, what, f"unknown array item type {item_type}")
        self.need(count * _MIN_VALUE_BYTES[item_type], what + f" ({count} items)")
        if item_type in _SCALARS:    # fixed-size items: one vectorized read
            fmt, nbytes = _SCALARS[item_type]
            values = np.frombuffer(self.buf, np.dtype(fmt), count, self.pos).tolist()
            self.pos += count * nbytes
            return values
        return [self.value(item_type, f"{what}[{i}]", depth + 1) for i in range(count)]


def _parse_metadata(p: _HeaderParser) -> tuple[int, int, dict[str, Any], dict[str, tuple[int, int | None]]]:
    """Magic, version, counts and every key/value.

    Returns (version, tensor_count, values, types); types[key] = (value type, array item type|None).
    """
    p.need(4, "magic")
    if bytes(p.buf[0:4]) != GGUF_MAGIC:
        raise E.BadMagic(p.path, "magic", f"expected b'GGUF', got {bytes(p.buf[0:4])!r}")
    p.pos = 4
    version = p.scalar(VType.UINT32, "version")
    if version not in SUPPORTED_VERSIONS:
        raise E.UnsupportedVersion(p.path, "version", f"{version} (supported: 2, 3, little-endian)")
    tensor_count = p.scalar(VType.UINT64, "tensor_count")
    kv_count = p.scalar(VType.UINT64, "kv_count")
    p.need(kv_count * 13, f"kv_count ({kv_count})")          # key length + type + 1-byte value
    p.need(tensor_count * 24, f"tensor_count ({tensor_count})")
    values: dict[str, Any] = {}
    types: dict[str, tuple[int, int | None]] = {}
    for i in range(kv_count):
        key = p.string(f"metadata key #{i}")
        vtype = p.scalar(VType.UINT32, f"{key} (value type)")
        if key in values:
            raise E.InvalidValue(p.path, key, "duplicate metadata key")
        if vtype == VType.ARRAY and p.pos + 4 <= p.size:
            types[key] = (VType.ARRAY, struct.unpack_from("<I", p.buf, p.pos)[0])
        else:
            types[key] = (vtype, None)
        values[key] = p.value(vtype, key)
    return version, tensor_count, values, types


def _parse_tensor_infos(p: _HeaderParser, count: int) -> list[tuple[str, int, tuple[int, ...], int]]:
    """(name, raw type, dims in GGUF order (ne0 first), relative offset) for each tensor."""
    infos = []
    for i in range(count):
        name = p.string(f"tensor #{i} name")
        n_dims = p.scalar(VType.UINT32, f"{name} (n_dims)")
        if not 1 <= n_dims <= MAX_DIMS:
            raise E.ShapeMismatch(p.path, name, f"n_dims {n_dims} not in [1, {MAX_DIMS}]")
        dims = tuple(p.scalar(VType.UINT64, f"{name} (dim {d})") for d in range(n_dims))
        raw_type = p.scalar(VType.UINT32, f"{name} (type)")
        offset = p.scalar(VType.UINT64, f"{name} (offset)")
        infos.append((name, raw_type, dims, offset))
    return infos


def _alignment(path: str, values: dict[str, Any]) -> int:
    align = values.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or isinstance(align, bool) or align <= 0 or align & (align - 1):
        raise E.InvalidValue(path, "general.alignment", f"must be a power of two, got {align!r}")
    return align


def _make_tensor(path: str, buf: mmap.mmap, size: int, data_start: int, alignment: int,
                 info: tuple[str, int, tuple[int, ...], int]) -> TensorInfo:
    name, raw_type, dims, offset = info
    if raw_type not in SUPPORTED_TYPES:
        raise E.UnsupportedTensorType(path, name, f"{type_name(raw_type)} (supported: "
                                      + ", ".join(t.name for t in SUPPORTED_TYPES) + ")")
    spec = quant_spec(raw_type)
    if any(d == 0 for d in dims):
        raise E.ShapeMismatch(path, name, f"zero dimension in {dims}")
    if dims[0] % spec.block_elems:
        raise E.ShapeMismatch(path, name, f"row length {dims[0]} is not a multiple of the "
                                          f"{spec.name} block ({spec.block_elems})")
    num_elems = 1
    for d in dims:
        num_elems *= d                                        # python int: cannot overflow
    nbytes = num_elems // spec.block_elems * spec.block_bytes
    if nbytes > size:
        raise E.SizeOverflow(path, name, f"{nbytes} data bytes, file has {size}")
    if offset % alignment:
        raise E.TensorOutOfBounds(path, name, f"offset {offset} not aligned to {alignment}")
    start = data_start + offset
    if start + nbytes > size:
        raise E.TensorOutOfBounds(path, name, f"data [{start}, {start + nbytes}) beyond file end {size}")
    data = np.frombuffer(buf, np.uint8, nbytes, start)
    return TensorInfo(name, QType(raw_type), tuple(reversed(dims)), data, nbytes)


def load_gguf(path: str | os.PathLike[str]) -> GGUFModel:
    """Open, validate and memory-map a qwen2 GGUF file. Raises `GGUFLoadError` subclasses."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size < 24:
                raise E.Truncated(path, "header", f"file has {size} bytes, a GGUF header needs 24")
            buf = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise E.FileUnreadable(path, "file", str(exc)) from None
    try:
        return _load_mapped(path, buf, size)
    except BaseException:
        _close_quietly(buf)
        raise


def _close_quietly(buf: mmap.mmap) -> None:
    try:
        buf.close()
    except BufferError:
        pass


def _load_mapped(path: Path, buf: mmap.mmap, size: int) -> GGUFModel:
    p = _HeaderParser(str(path), buf, size)
    version, tensor_count, values, types = _parse_metadata(p)
    infos = _parse_tensor_infos(p, tensor_count)
    alignment = _alignment(str(path), values)
    data_start = -(-p.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for info in infos:
        if info[0] in tensors:
            raise E.InvalidValue(path, info[0], "duplicate tensor name")
        tensors[info[0]] = _make_tensor(str(path), buf, size, data_start, alignment, info)
    config = config_from_metadata(path, values, tensors)
    check_tensor_shapes(path, config, tensors)
    return GGUFModel(path, version, config, values, types, tensors, alignment, data_start, size, buf)
