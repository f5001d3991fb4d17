"""Launcher of cuda/attention.cu: each query token (decode step or prompt chunk) over its paged
KV context (GQA), with the AttentionParams record and its checks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, record
from gpu_worker.backends.cuda.ops.rope_kv import QkvRows, RopeTables, check_rope_inputs

HEAD_DIM = 64          # the kernels are built for head_dim 64 (Qwen2.5-0.5B)
MAX_GROUP = 8          # q heads per kv head (QS_ATTN_MAX_GROUP): 4 warps each, block <= 1024 threads
SPLIT = 4              # warps per query head (QS_ATTN_SPLIT)
ROUND, ROW = 128, 72   # positions staged per round, halves per staged row (QS_ATTN_ROUND, QS_ATTN_ROW)
TILE_MAX_HEADS = 7     # attention_tiles_f32's largest heads_per_block (QS_ATTN_TILE_MAX_HEADS)
SHARED_BYTES = 2 * 2 * ROUND * ROW * 2   # two stages of K and V rounds (QS_ATTN_SHARED_BYTES)
_POINTERS = ("q", "out", "k_cache", "v_cache", "block_tables", "token_seq", "positions")
_ROPE_POINTERS = ("q_in", "k_in", "v_in", "bias_q", "bias_k", "bias_v", "cos_table", "sin_table", "slot_mapping")
PARAMS_FIELDS = [(name, "u8") for name in _POINTERS] + [
    ("max_blocks_per_seq", "i8"), ("num_heads", "i8"), ("num_kv_heads", "i8"), ("block_size", "i8"),
    ("heads_per_block", "i8"), ("scale", "f4"), ("pad_", "f4")] + [
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


def heads_per_block_for(num_tokens: int, num_heads: int, num_kv_heads: int, multiprocessors: int) -> int:
    """One query head per block while the (token, head) blocks fit twice over the multiprocessors
    (decode at small batches: the heads spread over more multiprocessors), else the whole GQA group
    (its K/V rows staged once, not once per head). Bitwise the same output either way. H200, context
    256: one head per block 10.2 / 10.8 us at 1 / 16 tokens (whole groups 11.5 / 11.7 us), but 40.5 us
    at 64 tokens (whole groups 12.0 us)."""
    group = num_heads // num_kv_heads
    return 1 if num_tokens * num_heads <= 2 * multiprocessors else group


def attention_kernel(num_blocks: int, multiprocessors: int) -> str:
    """attention_f32 (one block per token), or its build capped at 32 registers per thread so that
    two blocks share a multiprocessor when the grid holds more blocks than multiprocessors: a
    decode step of 256 sequences took 3.85 ms against 4.07 (H200, synthetic weights), while at
    batch 1 and 64 (grids that fit the GPU once) the cap cost ~1%. Bitwise the same output."""
    return "attention_f32_two_blocks_per_sm" if num_blocks > multiprocessors else "attention_f32"


def attention_params(q: DeviceTensor, out: DeviceTensor, k_cache: DeviceTensor, v_cache: DeviceTensor,
                     block_tables: DeviceTensor, token_seq: DeviceTensor, positions: DeviceTensor,
                     block_size: int, heads_per_block: int, rope: DecodeRope | None = None,
                     out16: DeviceTensor | None = None) -> np.void:
    """Checks shapes and packs the kernel record.

    q, out: [T, num_heads, 64] f32; caches: [num_slots, num_kv_heads, 64] f16;
    block_tables: [num_seqs, max_blocks_per_seq] int32; token_seq, positions: [T] int32;
    heads_per_block divides num_heads / num_kv_heads. With `rope` (a decode step), q is where
    rope_kv would have put the rotated q: only its shape is used. out16 ([T, num_heads * 64] f16, or
    None) also receives out, rounded to fp16 in the f16gemm layout's slot order (o's operand).
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
    group = num_heads // num_kv_heads
    if heads_per_block <= 0 or group % heads_per_block:
        raise ValueError(f"heads_per_block {heads_per_block} must divide the {group} query heads per kv head")
    values: dict[str, object] = {
        "q": q.ptr, "out": out.ptr, "k_cache": k_cache.ptr, "v_cache": v_cache.ptr,
        "block_tables": block_tables.ptr, "token_seq": token_seq.ptr, "positions": positions.ptr,
        "max_blocks_per_seq": block_tables.shape[1], "num_heads": num_heads,
        "num_kv_heads": num_kv_heads, "block_size": block_size, "heads_per_block": heads_per_block,
        "scale": 1.0 / np.sqrt(head_dim), "out16": 0 if out16 is None else out16.ptr}
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
                     block_size: int, heads_per_block: int | None = None, rope: DecodeRope | None = None,
                     query_tiles: bool | None = None, out16: DeviceTensor | None = None,
                     register_capped: bool | None = None) -> None:
    """out[t, h] = softmax(q[t, h] K[0..pos_t]^T / 8) V over sequence token_seq[t]'s blocks, for
    decode steps and prompt chunks alike. KV of every position <= pos_t must be written; with
    `rope` (decode steps: each token the newest of its sequence) every position < pos_t, and the
    kernel does rope_kv's work for pos_t itself.

    query_tiles (default: without `rope`): attention_tiles_f32, whose blocks take up to 4
    consecutive tokens of a sequence together (prompt chunks), else attention_f32 (a block per
    token; attention_kernel picks its build). All give bitwise the same output. heads_per_block: None
    picks by heads_per_block_for, register_capped by attention_kernel (tests force each value).
    out16: see attention_params."""
    num_tokens, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = k_cache.shape[1]
    if query_tiles is None:
        query_tiles = rope is None
    if query_tiles and rope is not None:
        raise ValueError("attention_tiles_f32 reads every K/V row from the cache: no rope (decode steps)")
    if heads_per_block is None:
        heads_per_block = heads_per_block_for(num_tokens, num_heads, num_kv_heads, device.multiprocessors)
        if query_tiles:   # the largest divisor of the group it takes
            heads_per_block = max(h for h in range(1, min(heads_per_block, TILE_MAX_HEADS) + 1)
                                  if heads_per_block % h == 0)
    if query_tiles and heads_per_block > TILE_MAX_HEADS:
        raise ValueError(f"heads_per_block {heads_per_block} exceeds attention_tiles_f32's {TILE_MAX_HEADS}")
    params = attention_params(q, out, k_cache, v_cache, block_tables, token_seq, positions, block_size,
                              heads_per_block, rope, out16)
    if query_tiles:
        name = "attention_tiles_f32"
    elif register_capped is None:
        name = attention_kernel(num_tokens * (num_heads // heads_per_block), device.multiprocessors)
    else:
        name = "attention_f32_two_blocks_per_sm" if register_capped else "attention_f32"
    launch(device.kernel(name, SHARED_BYTES), (num_tokens, num_heads // heads_per_block),
           (32 * SPLIT * heads_per_block,), device.stream, params, shared=SHARED_BYTES)
