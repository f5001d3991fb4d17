"""Launcher of cuda/rope_kv.cu: q/k/v bias + NeoX RoPE + paged KV-cache write."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, record

THREADS = 256
_POINTERS = ("q", "k", "v", "bias_q", "bias_k", "bias_v", "positions", "slot_mapping",
             "cos_table", "sin_table", "k_cache", "v_cache")
PARAMS_FIELDS = [(name, "u8") for name in _POINTERS] + [
    ("num_heads", "i8"), ("num_kv_heads", "i8"), ("head_dim", "i8")]


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


def launch_rope_kv(device, q: DeviceTensor, k: DeviceTensor, v: DeviceTensor, biases: tuple[DeviceTensor, ...],
                   positions: DeviceTensor, slot_mapping: DeviceTensor, tables: RopeTables,
                   k_cache: DeviceTensor, v_cache: DeviceTensor) -> None:
    """q: [T, num_heads, head_dim] f32 (rotated in place); k, v: [T, num_kv_heads, head_dim] f32;
    biases: (bias_q [num_heads*head_dim], bias_k, bias_v [num_kv_heads*head_dim]) f32;
    positions, slot_mapping: [T] int32 (slot < 0: no write); caches: [num_slots, num_kv_heads, head_dim] f16.
    Positions must be < tables.cos.shape[0] (the caller checks on the host)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    check_tensor("q", q, (num_tokens, num_heads, head_dim), np.float32)
    check_tensor("k", k, (num_tokens, num_kv_heads, head_dim), np.float32)
    check_tensor("v", v, (num_tokens, num_kv_heads, head_dim), np.float32)
    bias_q, bias_k, bias_v = biases
    check_tensor("bias_q", bias_q, (num_heads * head_dim,), np.float32)
    check_tensor("bias_k", bias_k, (num_kv_heads * head_dim,), np.float32)
    check_tensor("bias_v", bias_v, (num_kv_heads * head_dim,), np.float32)
    check_tensor("positions", positions, (num_tokens,), np.int32)
    check_tensor("slot_mapping", slot_mapping, (num_tokens,), np.int32)
    check_tensor("cos_table", tables.cos, (None, head_dim // 2), np.float32)
    check_tensor("k_cache", k_cache, (None, num_kv_heads, head_dim), np.float16)
    check_tensor("v_cache", v_cache, k_cache.shape, np.float16)
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    pointers = (q, k, v, bias_q, bias_k, bias_v, positions, slot_mapping, tables.cos, tables.sin,
                k_cache, v_cache)
    params = record(PARAMS_FIELDS, {**{name: t.ptr for name, t in zip(_POINTERS, pointers)},
                                    "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                                    "head_dim": head_dim})
    launch(device.kernel("rope_kv_f32"), (num_tokens,), (THREADS,), device.stream, params)
