"""Test helper: byte positions of the fields of a (valid) GGUF header, for targeted corruption.

Written independently of the loader's parser (plain struct walking of the GGUF v3 layout).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class KeyValueLayout:
    key: str
    key_len_at: int      # uint64 key length
    type_at: int         # uint32 value type
    value_at: int        # value (for strings: uint64 length; for arrays: uint32 item type)
    array_len_at: int | None = None


@dataclass
class TensorLayout:
    name: str
    name_len_at: int
    n_dims_at: int
    dims_at: int         # n_dims x uint64
    type_at: int         # uint32
    offset_at: int       # uint64


@dataclass
class HeaderLayout:
    kvs: dict[str, KeyValueLayout] = field(default_factory=dict)
    tensors: dict[str, TensorLayout] = field(default_factory=dict)
    end_of_header: int = 0


def _skip_value(buf: bytes, pos: int, vtype: int) -> int:
    if vtype in _SCALAR_SIZES:
        return pos + _SCALAR_SIZES[vtype]
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    item_type, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    for _ in range(count):
        pos = _skip_value(buf, pos, item_type)
    return pos


def header_layout(buf: bytes) -> HeaderLayout:
    layout = HeaderLayout()
    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    for _ in range(kv_count):
        (klen,) = struct.unpack_from("<Q", buf, pos)
        key = buf[pos + 8:pos + 8 + klen].decode()
        type_at = pos + 8 + klen
        (vtype,) = struct.unpack_from("<I", buf, type_at)
        kv = KeyValueLayout(key, pos, type_at, type_at + 4, type_at + 8 if vtype == 9 else None)
        layout.kvs[key] = kv
        pos = _skip_value(buf, type_at + 4, vtype)
    for _ in range(tensor_count):
        (nlen,) = struct.unpack_from("<Q", buf, pos)
        name = buf[pos + 8:pos + 8 + nlen].decode()
        n_dims_at = pos + 8 + nlen
        (n_dims,) = struct.unpack_from("<I", buf, n_dims_at)
        dims_at = n_dims_at + 4
        type_at = dims_at + 8 * n_dims
        layout.tensors[name] = TensorLayout(name, pos, n_dims_at, dims_at, type_at, type_at + 4)
        pos = type_at + 12
    layout.end_of_header = pos
    return layout
