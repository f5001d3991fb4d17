"""Launcher of cuda/rope_kv.cu: q/k/v bias + NeoX RoPE + paged KV-cache write."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, record

THREADS = 256
_POINTERS = ("q_in", "q_out", "k_in", "v_in", "bias_q", "bias_k", "bias_v", "positions", "slot_mapping",
             "cos_table", "sin_table", "k_cache", "v_cache")
PARAMS_FIELDS = [(name, "u8") for name in _POINTERS] + [
    ("num_heads", "i8"), ("num_kv_heads", "i8"), ("head_dim", "i8"), ("q_in_stride", "i8"), ("kv_in_stride", "i8")]


@dataclass(frozen=True)
class RopeTables:
    """cos/sin of angle = float32(pos) * inv_freq (float32), as the numpy reference computes them.

    cos, sin: [max_positions, head_dim / 2] f32 on the device.
    """

    cos: DeviceTensor
    sin: DeviceTensor


def rope_tables_host(max_positions: int, head_dim: int, rope_base: float) -> tuple[np.ndarray, np.ndarray]:
    """Host tables [max_positions, head_dim / 2]; the same float32 rounding as qwen2_reference."""
    inv_freq = (1.0 / rope_base ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    angles = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    return np.ascontiguousarray(np.cos(angles)), np.ascontiguousarray(np.sin(angles))


@dataclass(frozen=True)
class QkvRows:
    """Where rope_kv reads this step's q, k, v (rows of any stride, e.g. columns of one
    [T, q + k + v] buffer) and writes the rotated q.

    q_in: [T, >= num_heads * head_dim] f32 (its first columns), row stride q_in_stride floats;
    k_in, v_in: [T, >= num_kv_heads * head_dim] f32, row stride kv_in_stride; q_out: [T, num_heads,
    head_dim] f32, contiguous (may be q_in when that is contiguous too).
    """

    q_in: int
    k_in: int
    v_in: int
    q_in_stride: int
    kv_in_stride: int
    q_out: DeviceTensor


def check_rope_inputs(rows: QkvRows, biases: tuple[DeviceTensor, ...], positions: DeviceTensor,
                      slot_mapping: DeviceTensor, tables: RopeTables, k_cache: DeviceTensor,
                      v_cache: DeviceTensor) -> None:
    """ValueError unless rope_kv's inputs fit together (shapes in launch_rope_kv's docstring)."""
    q_out = rows.q_out
    num_tokens, num_heads, head_dim = q_out.shape
    check_tensor("k_cache", k_cache, (None, None, head_dim), np.float16)
    num_kv_heads = k_cache.shape[1]
    check_tensor("q_out", q_out, (num_tokens, num_heads, head_dim), np.float32)
    if rows.q_in_stride < num_heads * head_dim or rows.kv_in_stride < num_kv_heads * head_dim:
        raise ValueError(f"rope_kv row strides must cover a row: q_in_stride {rows.q_in_stride} >= "
                         f"{num_heads * head_dim}, kv_in_stride {rows.kv_in_stride} >= {num_kv_heads * head_dim}")
    for name in ("q_in", "k_in", "v_in"):
        if int(getattr(rows, name)) <= 0 or int(getattr(rows, name)) % 4:
            raise ValueError(f"rope_kv {name} must be a non-null float address, got {int(getattr(rows, name)):#x}")
    bias_q, bias_k, bias_v = biases
    check_tensor("bias_q", bias_q, (num_heads * head_dim,), np.float32)
    check_tensor("bias_k", bias_k, (num_kv_heads * head_dim,), np.float32)
    check_tensor("bias_v", bias_v, (num_kv_heads * head_dim,), np.float32)
    check_tensor("positions", positions, (num_tokens,), np.int32)
    check_tensor("slot_mapping", slot_mapping, (num_tokens,), np.int32)
    check_tensor("cos_table", tables.cos, (None, head_dim // 2), np.float32)
    check_tensor("v_cache", v_cache, k_cache.shape, np.float16)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")


def launch_rope_kv(device, rows: QkvRows, biases: tuple[DeviceTensor, ...],
                   positions: DeviceTensor, slot_mapping: DeviceTensor, tables: RopeTables,
                   k_cache: DeviceTensor, v_cache: DeviceTensor) -> None:
    """Rotated q -> rows.q_out; k (rotated) and v -> the caches as fp16.
    biases: (bias_q [num_heads*head_dim], bias_k, bias_v [num_kv_heads*head_dim]) f32;
    positions, slot_mapping: [T] int32 (slot < 0: no write); caches: [num_slots, num_kv_heads, head_dim] f16.
    Positions must be < tables.cos.shape[0] (the caller checks on the host)."""
    check_rope_inputs(rows, biases, positions, slot_mapping, tables, k_cache, v_cache)
    q_out = rows.q_out
    num_tokens, num_heads, head_dim = q_out.shape
    bias_q, bias_k, bias_v = biases
    pointers = (rows.q_in, q_out.ptr, rows.k_in, rows.v_in, bias_q.ptr, bias_k.ptr, bias_v.ptr, positions.ptr,
                slot_mapping.ptr, tables.cos.ptr, tables.sin.ptr, k_cache.ptr, v_cache.ptr)
    params = record(PARAMS_FIELDS, {**{name: int(ptr) for name, ptr in zip(_POINTERS, pointers)},
                                    "num_heads": num_heads, "num_kv_heads": k_cache.shape[1], "head_dim": head_dim,
                                    "q_in_stride": rows.q_in_stride, "kv_in_stride": rows.kv_in_stride})
    launch(device.kernel("rope_kv_f32"), (num_tokens,), (THREADS,), device.stream, params)
