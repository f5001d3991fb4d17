"""Launcher of cuda/attention.cu: each query token (decode step or prompt chunk) over its paged
KV context (GQA), with the AttentionParams record and its checks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, record
from gpu_worker.backends.cuda.ops.rope_kv import QkvRows, RopeTables, check_rope_inputs

HEAD_DIM = 64          # the kernels are built for head_dim 64 (Qwen2.5-0.5B)
MMA_ROWS = 16          # (token, head) rows per warp: the mma's M (QS_ATTN_MMA_ROWS)
MAX_GROUP = MMA_ROWS   # q heads per kv head: one token's heads fill at most one warp's rows
SPLIT = 4              # warps per row group (QS_ATTN_SPLIT)
ROUND, ROW = 128, 72   # positions staged per round, halves per staged row (QS_ATTN_ROUND, QS_ATTN_ROW)
MAX_ROW_GROUPS = 2     # attention_mma's largest row_groups (QS_ATTN_MMA_MAX_ROW_GROUPS)
# QS_ATTN_SHARED_BYTES: two stages of K and V rounds, then fp16 hi and lo q rows (MMA_ROWS per row group)
SHARED_BYTES = 2 * 2 * ROUND * ROW * 2 + 2 * MAX_ROW_GROUPS * MMA_ROWS * ROW * 2
_POINTERS = ("q", "out", "k_cache", "v_cache", "block_tables", "token_seq", "positions")
_ROPE_POINTERS = ("q_in", "k_in", "v_in", "bias_q", "bias_k", "bias_v", "cos_table", "sin_table", "slot_mapping")
PARAMS_FIELDS = [(name, "u8") for name in _POINTERS] + [
    ("max_blocks_per_seq", "i8"), ("num_heads", "i8"), ("num_kv_heads", "i8"), ("block_size", "i8"),
    ("scale", "f4"), ("pad_", "f4")] + [
    (name, "u8") for name in _ROPE_POINTERS] + [
    ("q_in_stride", "i8"), ("kv_in_stride", "i8"), ("rope_fused", "i8"), ("out16", "u8")]


@dataclass(frozen=True)
class DecodeRope:
    """rope_kv's inputs, for a decode step whose attention applies them itself (every token is
    the newest of its sequence): q/k/v rows unrotated, biases, tables, slot_mapping [T] int32."""

    rows: QkvRows
    biases: tuple[DeviceTensor, DeviceTensor, DeviceTensor]
    tables: RopeTables
    slot_mapping: DeviceTensor


def row_groups_for(rope: DecodeRope | None) -> int:
    """Warps of 16 (token, head) rows per split in a block: 1 for decode steps (one token per
    block), 2 for prompt chunks (4 tokens per block: their K/V rows staged once). Bitwise the same
    output either way. Forward of a 512 / 2048-token prompt as a graph (H200, synthetic weights):
    4.34 / 15.66 ms with 1, 4.24 / 14.36 with 2 (4, in an earlier build: 4.26 / 14.40)."""
    return 1 if rope is not None else MAX_ROW_GROUPS


def head_parts_for(num_tokens: int, num_heads: int, num_kv_heads: int, multiprocessors: int,
                   rope: DecodeRope | None) -> int:
    """Blocks per kv head: in decode steps whose (token, query head) pairs fit twice over the
    multiprocessors, one per query head (more multiprocessors busy on the short per-block chain);
    else 1, every block staging its kv head's rows for all of the group's heads. Bitwise the same
    output either way."""
    group = num_heads // num_kv_heads
    return group if rope is not None and num_tokens * num_heads <= 2 * multiprocessors else 1


def attention_params(q: DeviceTensor, out: DeviceTensor, k_cache: DeviceTensor, v_cache: DeviceTensor,
                     block_tables: DeviceTensor, token_seq: DeviceTensor, positions: DeviceTensor,
                     block_size: int, rope: DecodeRope | None = None,
                     out16: DeviceTensor | None = None) -> np.void:
    """Checks shapes and packs the kernel record.

    q, out: [T, num_heads, 64] f32; caches: [num_slots, num_kv_heads, 64] f16;
    block_tables: [num_seqs, max_blocks_per_seq] int32; token_seq, positions: [T] int32. With
    `rope` (a decode step), q is where rope_kv would have put the rotated q: only its shape is
    used. out16 ([T, num_heads * 64] f16, or None) also receives out, rounded to fp16 in the
    f16gemm layout's slot order (o's operand). Caches of 2^32 halves or more are refused (the
    kernel's row offsets are 32-bit).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    if head_dim != HEAD_DIM:
        raise ValueError(f"attention kernels are built for head_dim {HEAD_DIM}, got {head_dim}")
    if num_heads % num_kv_heads or num_heads // num_kv_heads > MAX_GROUP:
        raise ValueError(f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}, "
                         f"at most {MAX_GROUP} per kv head")
    check_tensor("q", q, (num_tokens, num_heads, HEAD_DIM), np.float32)
    check_tensor("out", out, (num_tokens, num_heads, HEAD_DIM), np.float32)
    if out16 is not None:
        check_tensor("out16", out16, (num_tokens, num_heads * HEAD_DIM), np.float16)
    check_tensor("k_cache", k_cache, (None, num_kv_heads, HEAD_DIM), np.float16)
    check_tensor("v_cache", v_cache, k_cache.shape, np.float16)
    check_tensor("block_tables", block_tables, (None, None), np.int32)
    check_tensor("token_seq", token_seq, (num_tokens,), np.int32)
    check_tensor("positions", positions, (num_tokens,), np.int32)
    if block_size <= 0 or k_cache.shape[0] % block_size:
        raise ValueError(f"block_size {block_size} must divide the {k_cache.shape[0]} cache slots")
    if k_cache.shape[0] * num_kv_heads * HEAD_DIM >= 2**32:
        raise ValueError(f"k_cache of {k_cache.shape[0]} slots exceeds the kernel's 32-bit element offsets")
    values: dict[str, object] = {
        "q": q.ptr, "out": out.ptr, "k_cache": k_cache.ptr, "v_cache": v_cache.ptr,
        "block_tables": block_tables.ptr, "token_seq": token_seq.ptr, "positions": positions.ptr,
        "max_blocks_per_seq": block_tables.shape[1], "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "block_size": block_size, "scale": 1.0 / np.sqrt(head_dim),
        "out16": 0 if out16 is None else out16.ptr}
    if rope is not None:
        check_rope_inputs(rope.rows, rope.biases, positions, rope.slot_mapping, rope.tables, k_cache, v_cache)
        bias_q, bias_k, bias_v = rope.biases
        values.update(q_in=rope.rows.q_in, k_in=rope.rows.k_in, v_in=rope.rows.v_in, bias_q=bias_q.ptr,
                      bias_k=bias_k.ptr, bias_v=bias_v.ptr, cos_table=rope.tables.cos.ptr,
                      sin_table=rope.tables.sin.ptr, slot_mapping=rope.slot_mapping.ptr,
                      q_in_stride=rope.rows.q_in_stride, kv_in_stride=rope.rows.kv_in_stride, rope_fused=1)
    return record(PARAMS_FIELDS, values)


def launch_attention(device, q: DeviceTensor, out: DeviceTensor, k_cache: DeviceTensor, v_cache: DeviceTensor,
                     block_tables: DeviceTensor, token_seq: DeviceTensor, positions: DeviceTensor,
                     block_size: int, rope: DecodeRope | None = None, out16: DeviceTensor | None = None,
                     row_groups: int | None = None, head_parts: int | None = None) -> None:
    """out[t, h] = softmax(q[t, h] K[0..pos_t]^T / 8) V over sequence token_seq[t]'s blocks, for
    decode steps and prompt chunks alike. KV of every position <= pos_t must be written; with
    `rope` (decode steps: each token the newest of its sequence) every position < pos_t, and the
    kernel does rope_kv's work for pos_t itself.

    row_groups (1..2; None: row_groups_for) sets the block: 128 threads per group of 16 (token,
    head) rows; 1 runs attention_mma_decode, the same code built for 128 threads. head_parts (1 or
    the group size, with row_groups 1; None: head_parts_for) spreads a kv head's query heads over
    that many blocks. Every value gives bitwise the same output (tests force each). out16: see
    attention_params."""
    num_tokens, num_heads, num_kv_heads = q.shape[0], q.shape[1], k_cache.shape[1]
    if row_groups is None:
        row_groups = row_groups_for(rope)
    if not 1 <= row_groups <= MAX_ROW_GROUPS or (rope is not None and row_groups != 1):
        raise ValueError(f"row_groups {row_groups} must be 1..{MAX_ROW_GROUPS}, and 1 for a decode step (rope)")
    if head_parts is None:
        head_parts = head_parts_for(num_tokens, num_heads, num_kv_heads, device.multiprocessors, rope)
    if head_parts not in (1, num_heads // num_kv_heads) or (head_parts > 1 and row_groups != 1):
        raise ValueError(f"head_parts {head_parts} must be 1 or the {num_heads // num_kv_heads} query heads "
                         f"per kv head (then with row_groups 1)")
    params = attention_params(q, out, k_cache, v_cache, block_tables, token_seq, positions, block_size, rope, out16)
    name = "attention_mma_decode" if row_groups == 1 else "attention_mma"
    launch(device.kernel(name, SHARED_BYTES), (num_tokens, num_kv_heads * head_parts), (32 * SPLIT * row_groups,),
           device.stream, params, shared=SHARED_BYTES)
