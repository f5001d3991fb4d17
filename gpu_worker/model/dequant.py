"""Vectorized numpy dequantizers for the supported GGML types (layouts as in ggml-common.h).

Each `_dequant_<type>(blocks, out)` turns raw blocks # [n, block_bytes] uint8 into
# [n, block_elems] float32 written into `out`. Whole tensors are processed in chunks of blocks
(temporaries stay in cache) spread over a small thread pool (numpy releases the GIL).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as QType

from gpu_worker.model.quant_types import quant_spec

CHUNK_ELEMS = 1 << 18          # elements per work item (1 MiB of float32 output)
_NUM_THREADS = max(1, min(4, os.cpu_count() or 1))
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte `start` of each block as float32 # [n, 1]."""
    return blocks[:, start:start + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles then high nibbles: element j is qs[j] & 15, element j + len is qs[j] >> 4."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1)


def _dequant_q8_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(blocks[:, 2:].view(np.int8), _f16(blocks, 0), out=out)


def _q4_0_ints(blocks: np.ndarray) -> np.ndarray:
    """q - 8 of each value (x = d * (q - 8)) # [n, 32] int8."""
    return _nibbles(blocks[:, 2:18]).view(np.int8) - np.int8(8)


def _dequant_q4_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_q4_0_ints(blocks), _f16(blocks, 0), out=out)


def _dequant_q4_1(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_nibbles(blocks[:, 4:20]), _f16(blocks, 0), out=out)
    out += _f16(blocks, 2)


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Bit j of the little-endian uint32 qh[:, 0:4], shifted to value 16 # [n, 32]."""
    return np.unpackbits(qh, axis=1, bitorder="little") << 4


def _q5_0_ints(blocks: np.ndarray) -> np.ndarray:
    """q - 16 of each value (x = d * (q - 16)) # [n, 32] int8."""
    return (_nibbles(blocks[:, 6:22]) | _high_bits_32(blocks[:, 2:6])).view(np.int8) - np.int8(16)


def _dequant_q5_0(blocks: np.ndarray, out: np.ndarray) -> None:
    np.multiply(_q5_0_ints(blocks), _f16(blocks, 0), out=out)


def _dequant_q5_1(blocks: np.ndarray, out: np.ndarray) -> None:
    q = _nibbles(blocks[:, 8:24]) | _high_bits_32(blocks[:, 4:8])
    np.multiply(q, _f16(blocks, 0), out=out)
    out += _f16(blocks, 2)


def _k_scales_mins(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 six-bit scales and mins packed in bytes 4..15, times d and dmin # [n, 8]."""
    s = blocks[:, 4:16]
    sc = np.concatenate((s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)), axis=1)
    mn = np.concatenate((s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)), axis=1)
    return sc * _f16(blocks, 0), mn * _f16(blocks, 2)


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs # [n, 128] -> # [n, 8, 32]: sub-block 2j = low nibbles of qs[32j:32j+32], 2j+1 = high."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate((q & 0x0F, q >> 4), axis=2).reshape(-1, 8, 32)


def _dequant_q4_k(blocks: np.ndarray, out: np.ndarray) -> None:
    scale, minimum = _k_scales_mins(blocks)
    out3 = out.reshape(-1, 8, 32)
    np.multiply(_k_low_nibbles(blocks[:, 16:144]), scale[:, :, None], out=out3)
    out3 -= minimum[:, :, None]


def _dequant_q5_k(blocks: np.ndarray, out: np.ndarray) -> None:
    scale, minimum = _k_scales_mins(blocks)
    # bit s of qh[l] is the 5th bit of element l of sub-block s # [n, 32, 8] -> [n, 8, 32]
    high = np.unpackbits(blocks[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8)
    q = _k_low_nibbles(blocks[:, 48:176]) | (high.transpose(0, 2, 1) << 4)
    out3 = out.reshape(-1, 8, 32)
    np.multiply(q, scale[:, :, None], out=out3)
    out3 -= minimum[:, :, None]


_Q6_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def _dequant_q6_k(blocks: np.ndarray, out: np.ndarray) -> None:
    # Two halves h of 128 elements; quarter k of a half, element l: y[128h + 32k + l].
    ql = blocks[:, 0:128].reshape(-1, 2, 1, 2, 32)           # [n, h, 1, a, l]: ql[64h + 32a + l]
    low = np.concatenate((ql & 0x0F, ql >> 4), axis=2).reshape(-1, 2, 4, 32)   # k = 2*nibble + a
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32)            # [n, h, 1, l]
    q = (low | (((qh >> _Q6_SHIFTS) & 3) << 4)).view(np.int8) - np.int8(32)
    scales = blocks[:, 192:208].view(np.int8).reshape(-1, 2, 4, 2, 1) * _f16(blocks, 208)[:, :, None, None, None]
    np.multiply(q.reshape(-1, 2, 4, 2, 16), scales, out=out.reshape(-1, 2, 4, 2, 16))


def _dequant_f32(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.reshape(-1).view(np.float32).reshape(out.shape)


def _dequant_f16(blocks: np.ndarray, out: np.ndarray) -> None:
    out[...] = blocks.reshape(-1).view(np.float16).reshape(out.shape)


def _dequant_bf16(blocks: np.ndarray, out: np.ndarray) -> None:
    bits = blocks.reshape(-1).view(np.uint16).astype(np.uint32) << 16
    out[...] = bits.view(np.float32).reshape(out.shape)


_DEQUANTIZERS: dict[QType, Callable[[np.ndarray, np.ndarray], None]] = {
    QType.F32: _dequant_f32, QType.F16: _dequant_f16, QType.BF16: _dequant_bf16,
    QType.Q8_0: _dequant_q8_0, QType.Q4_0: _dequant_q4_0, QType.Q4_1: _dequant_q4_1,
    QType.Q5_0: _dequant_q5_0, QType.Q5_1: _dequant_q5_1, QType.Q4_K: _dequant_q4_k,
    QType.Q5_K: _dequant_q5_k, QType.Q6_K: _dequant_q6_k,
}


def dequantize_blocks(qtype: QType, raw: np.ndarray) -> np.ndarray:
    """Raw bytes of whole blocks (any shape, uint8) -> flat float32 # [num_blocks * block_elems]."""
    spec = quant_spec(qtype)
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size % spec.block_bytes:
        raise ValueError(f"{raw.size} bytes is not whole {spec.name} blocks of {spec.block_bytes}")
    blocks = raw.reshape(-1, spec.block_bytes)
    out = np.empty((blocks.shape[0], spec.block_elems), dtype=np.float32)
    _run_chunked(_DEQUANTIZERS[spec.qtype], blocks, out, spec.block_elems)
    return out.reshape(-1)


def _run_chunked(fn: Callable[[np.ndarray, np.ndarray], None], blocks: np.ndarray,
                 out: np.ndarray, block_elems: int) -> None:
    global _pool, _pool_pid
    step = max(1, CHUNK_ELEMS // block_elems)
    starts = range(0, blocks.shape[0], step)
    if len(starts) <= 1 or _NUM_THREADS == 1:
        for a in starts:
            fn(blocks[a:a + step], out[a:a + step])
        return
    if _pool is None or _pool_pid != os.getpid():     # a forked child must not reuse the parent's pool
        _pool = ThreadPoolExecutor(_NUM_THREADS, thread_name_prefix="dequant")
        _pool_pid = os.getpid()
    for future in [_pool.submit(fn, blocks[a:a + step], out[a:a + step]) for a in starts]:
        future.result()


# Types whose values are d * (q - bias) with the fp16 scale d first in a 32-value block and a small
# integer q - bias: Q8_0 ({half d; int8 q[32]}, x = d * q) holds the same values exactly.
_Q8_0_EXACT = {QType.Q4_0: _q4_0_ints, QType.Q5_0: _q5_0_ints}
Q8_0_EXACT_FROM = frozenset(_Q8_0_EXACT)


def as_q8_0(qtype: QType, raw: np.ndarray) -> np.ndarray:
    """Whole blocks of a Q4_0 or Q5_0 tensor re-encoded as Q8_0 blocks with the same d and the
    integers q - bias: every value d * (q - bias) is the same product, so any kernel that forms
    d * q from either encoding gets the same bits (flat uint8, 34 bytes per 32 values)."""
    qtype = QType(qtype)
    if qtype not in _Q8_0_EXACT:
        raise ValueError(f"{qtype.name} has no exact Q8_0 encoding (only {sorted(t.name for t in _Q8_0_EXACT)})")
    spec = quant_spec(qtype)
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, spec.block_bytes)
    out = np.empty((blocks.shape[0], quant_spec(QType.Q8_0).block_bytes), np.uint8)
    out[:, :2] = blocks[:, :2]
    out[:, 2:] = _Q8_0_EXACT[qtype](blocks).view(np.uint8)
    return out.reshape(-1)


def dequantize(tensor) -> np.ndarray:
    """A whole tensor as float32 of shape `tensor.shape` (a TensorInfo from gguf_loader)."""
    return dequantize_blocks(tensor.qtype, tensor.data).reshape(tensor.shape)


def dequantize_rows(tensor, row_ids) -> np.ndarray:
    """Rows `row_ids` of a 2-D tensor as float32 # [len(row_ids), cols]; only those rows are read
    (embedding lookup). IndexError for ids outside [0, rows)."""
    if len(tensor.shape) != 2:
        raise ValueError(f"{tensor.name}: dequantize_rows needs a 2-D tensor, shape is {tensor.shape}")
    ids = np.asarray(row_ids)
    if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
        raise ValueError(f"row_ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
    rows = tensor.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise IndexError(f"{tensor.name}: row ids must be in [0, {rows})")
    raw = tensor.rows_view()[ids.astype(np.int64)]           # [n, row_nbytes] copy of just those rows
    return dequantize_blocks(tensor.qtype, raw).reshape(ids.size, tensor.shape[1])
