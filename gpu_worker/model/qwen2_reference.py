"""Qwen2 forward in numpy float32: the readable oracle every other backend is checked against.

Reads top to bottom like gpt-fast's model.py: weights (dequantized once to float32 at load), then
the ops (linear, RMSNorm, NeoX RoPE, paged-KV attention with GQA, SwiGLU), then `forward`.

Batch invariance (a sequence's logits are bitwise the same alone, batched with others, or prefilled
in other chunk sizes) is designed in, not hoped for:
- every weight matmul runs on fixed tiles of ROW_TILE rows (zero-padded), because BLAS picks
  different kernels for different M (M=1 goes to gemv and rounds differently); within one tile
  shape a row's result depends only on that row (tests/test_cpu_backend.py checks it);
- attention runs per query token with the same shapes it would have in a one-token decode, and it
  always reads K/V back from the fp16 cache, also for the chunk just written;
- everything else is row-wise.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.dequant import dequantize, dequantize_rows

if TYPE_CHECKING:
    from gpu_worker.backends.base import StepBatch
    from gpu_worker.model.gguf_loader import GGUFModel, TensorInfo

# Rows per BLAS call. Measured on 2 cores (1 BLAS thread, real model): 8 costs the same prefill CPU
# time as 16 and 30% less per decode step (0.33 vs 0.47 CPU s); 4 makes prefill 40% dearer.
ROW_TILE = 8
MAX_MATMUL_THREADS = 4
log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LayerWeights:
    """One decoder layer, float32, rows = output features (y = x @ W.T)."""

    attn_norm: np.ndarray       # [hidden]
    qkv_weight: np.ndarray      # [(num_heads + 2 * num_kv_heads) * head_dim, hidden]: q, k, v stacked
    qkv_bias: np.ndarray        # [(num_heads + 2 * num_kv_heads) * head_dim]
    o_weight: np.ndarray        # [hidden, num_heads * head_dim]
    ffn_norm: np.ndarray        # [hidden]
    gate_up_weight: np.ndarray  # [2 * intermediate, hidden]: gate rows, then up rows
    down_weight: np.ndarray     # [hidden, intermediate]


@dataclass(frozen=True, eq=False)
class Qwen2Weights:
    config: ModelConfig
    token_embd: TensorInfo          # stays quantized: rows are dequantized on lookup
    layers: tuple[LayerWeights, ...]
    output_norm: np.ndarray         # [hidden]
    lm_head: np.ndarray             # [vocab, hidden]
    inv_freq: np.ndarray            # [head_dim / 2] RoPE inverse frequencies, float32
    # True: every matmul's operands are rounded to fp16 (weights here, inputs in `linear`), products
    # summed in float32: the arithmetic contract of the CUDA tensor-core linear kernel (linear_mma.cu).
    fp16_operands: bool = False

    @property
    def nbytes(self) -> int:
        """Bytes held in memory for the weights (float32 copies + the quantized embedding)."""
        arrays = [self.output_norm, self.lm_head, self.inv_freq]
        for layer in self.layers:
            arrays += [getattr(layer, name) for name in LayerWeights.__dataclass_fields__]
        return sum(a.nbytes for a in arrays) + self.token_embd.nbytes


def load_weights(model: GGUFModel, fp16_operands: bool = False) -> Qwen2Weights:
    """Dequantize every matrix of `model` to float32 once (about 2 GB for Qwen2.5-0.5B); with
    fp16_operands, each matrix is rounded to fp16 values (kept as float32) after dequantization."""
    config = model.config
    layers = tuple(_load_layer(model, i, fp16_operands) for i in range(config.num_layers))
    head_dim = config.head_dim
    # base^(-2i/d) in float64, stored as float32 (HF computes it in float32: < 1 ulp apart)
    inv_freq = (1.0 / config.rope_freq_base ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
    return Qwen2Weights(
        config=config,
        token_embd=model.tensors["token_embd.weight"],
        layers=layers,
        output_norm=_float32(model.tensors["output_norm.weight"]),
        lm_head=_matrix(model.lm_head, fp16_operands),    # output.weight, or token_embd.weight when tied
        inv_freq=inv_freq,
        fp16_operands=fp16_operands,
    )


def _float32(tensor: TensorInfo) -> np.ndarray:
    return np.ascontiguousarray(dequantize(tensor), dtype=np.float32).reshape(tensor.shape)


def _matrix(tensor: TensorInfo, fp16_operands: bool) -> np.ndarray:
    values = _float32(tensor)
    return values.astype(np.float16).astype(np.float32) if fp16_operands else values


def _load_layer(model: GGUFModel, i: int, fp16_operands: bool = False) -> LayerWeights:
    def get(part: str) -> np.ndarray:
        name = f"blk.{i}.{part}"
        if part.endswith(".weight") and not part.endswith("norm.weight"):
            return _matrix(model.tensors[name], fp16_operands)
        return _float32(model.tensors[name])

    return LayerWeights(
        attn_norm=get("attn_norm.weight"),
        qkv_weight=np.concatenate([get("attn_q.weight"), get("attn_k.weight"), get("attn_v.weight")]),
        qkv_bias=np.concatenate([get("attn_q.bias"), get("attn_k.bias"), get("attn_v.bias")]),
        o_weight=get("attn_output.weight"),
        ffn_norm=get("ffn_norm.weight"),
        gate_up_weight=np.concatenate([get("ffn_gate.weight"), get("ffn_up.weight")]),
        down_weight=get("ffn_down.weight"),
    )


class PagedKVCache:
    """Per layer, K and V each # [num_blocks, block_size, num_kv_heads, head_dim] float16.

    slot = block_id * block_size + offset (docs/ARCHITECTURE.md), the same layout as the cuda backend.
    dtype float32 exists only to measure what the fp16 storage costs against a float32 reference.
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int,
                 dtype: type[np.floating] = np.float16) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be > 0, got {num_blocks}, {block_size}")
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.k = [np.zeros(shape, dtype) for _ in range(config.num_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(config.num_layers)]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v)

    def write(self, layer: int, slots: np.ndarray, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: # [num_tokens, num_kv_heads, head_dim] stored (rounded to fp16) at `slots`."""
        kv_shape = self.k[layer].shape[2:]
        self.k[layer].reshape(-1, *kv_shape)[slots] = k
        self.v[layer].reshape(-1, *kv_shape)[slots] = v

    def read(self, layer: int, block_table: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """The first `length` positions of one sequence as float32 # [num_kv_heads, length, head_dim]."""
        num_blocks = -(-length // self.block_size)
        blocks = block_table[:num_blocks]
        kv_shape = self.k[layer].shape[2:]
        k = self.k[layer][blocks].reshape(-1, *kv_shape)[:length]
        v = self.v[layer][blocks].reshape(-1, *kv_shape)[:length]
        return (np.ascontiguousarray(k.transpose(1, 0, 2), dtype=np.float32),
                np.ascontiguousarray(v.transpose(1, 0, 2), dtype=np.float32))


def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
           fp16_inputs: bool = False) -> np.ndarray:
    """x # [n, in] @ weight.T # [out, in] (+ bias) -> # [n, out], in fixed ROW_TILE-row BLAS calls.
    fp16_inputs rounds x to fp16 values first (Qwen2Weights.fp16_operands).

    Each call is weight @ tile.T (the weight as BLAS's A operand): for a few rows that streams the
    weight ~1.5x faster than tile @ weight.T. The output features are split into fixed ranges, one
    per matmul thread running single-threaded BLAS: OpenBLAS's own threads spin while they wait,
    which made decode 3-6x slower whenever other processes shared the 2 cores; these block instead.
    Tile and ranges depend only on the weight's shape, so a row's result depends only on that row.
    """
    n = x.shape[0]
    num_padded = -(-n // ROW_TILE) * ROW_TILE
    padded = np.zeros((num_padded, x.shape[1]), np.float32)
    padded[:n] = x.astype(np.float16) if fp16_inputs else x
    out_t = np.empty((weight.shape[0], num_padded), np.float32)       # [out, num_padded]

    def run_rows_of_weight(lo: int, hi: int) -> None:
        for start in range(0, num_padded, ROW_TILE):
            tile = padded[start:start + ROW_TILE]
            np.matmul(weight[lo:hi], tile.T, out=out_t[lo:hi, start:start + ROW_TILE])

    pool = _matmul_pool()
    for future in [pool.submit(run_rows_of_weight, lo, hi) for lo, hi in column_ranges(weight.shape[0])]:
        future.result()
    out = np.ascontiguousarray(out_t[:, :n].T)
    if bias is not None:
        out += bias
    return out


def num_matmul_threads() -> int:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_MATMUL_THREADS, usable))


def column_ranges(num_out: int) -> list[tuple[int, int]]:
    """[lo, hi) output-feature (weight row) ranges, one per matmul thread, on multiples of 16."""
    parts = min(num_matmul_threads(), max(1, num_out // 64))
    bounds = [min(num_out, -(-num_out * i // parts // 16) * 16) for i in range(parts)] + [num_out]
    return [(lo, hi) for lo, hi in zip(bounds, bounds[1:]) if hi > lo]


_pool: ThreadPoolExecutor | None = None


def _forget_pool_after_fork() -> None:
    global _pool
    _pool = None   # a forked child has none of the parent's threads: make a new pool on first use


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def _matmul_pool() -> ThreadPoolExecutor:
    """The process's matmul threads, created on first use; BLAS is limited to 1 thread then."""
    global _pool
    if _pool is None:
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=1, user_api="blas")
        except ImportError:   # still correct, only slower on busy machines
            log.warning("threadpoolctl is missing: BLAS keeps its own threads (slower under load)")
        _pool = ThreadPoolExecutor(num_matmul_threads(), thread_name_prefix="matmul")
    return _pool


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x # [n, hidden]: x / sqrt(mean(x^2) + eps) * weight, row by row."""
    mean_square = np.mean(x * x, axis=-1, keepdims=True)
    return (x * (1.0 / np.sqrt(mean_square + np.float32(eps)))) * weight


def rope_cos_sin(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin # [n, 1, head_dim / 2] of angle = position * inv_freq, in float32 like HF."""
    angles = positions.astype(np.float32)[:, None] * inv_freq[None, :]
    return np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotation of x # [n, heads, head_dim]: pairs are (i, i + head_dim/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1.0) + np.exp(-x))


def attend_one_query(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Causal attention of one token over its context, GQA.

    q # [num_kv_heads, group, head_dim] (group = q heads per kv head); k, v # [num_kv_heads, L, head_dim]
    where L = position + 1. Returns # [num_kv_heads, group, head_dim].
    """
    scale = np.float32(1.0 / np.sqrt(q.shape[-1]))
    scores = np.matmul(q, k.transpose(0, 2, 1)) * scale        # [kv, group, L]
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=-1, keepdims=True)
    return np.matmul(probs, v)                                  # [kv, group, head_dim]


def attention_block(layer: LayerWeights, x: np.ndarray, layer_index: int, kv: PagedKVCache,
                    batch: StepBatch, cos: np.ndarray, sin: np.ndarray, config: ModelConfig,
                    fp16_inputs: bool = False) -> np.ndarray:
    """Self-attention of the normed hidden states x # [num_tokens, hidden] -> # [num_tokens, hidden]."""
    n, d = x.shape[0], config.head_dim
    num_q, num_kv = config.num_heads, config.num_kv_heads
    qkv = linear(x, layer.qkv_weight, layer.qkv_bias, fp16_inputs)
    q = apply_rope(qkv[:, :num_q * d].reshape(n, num_q, d), cos, sin)
    k = apply_rope(qkv[:, num_q * d:(num_q + num_kv) * d].reshape(n, num_kv, d), cos, sin)
    v = qkv[:, (num_q + num_kv) * d:].reshape(n, num_kv, d)
    kv.write(layer_index, batch.slot_mapping, k, v)

    group = num_q // num_kv
    out = np.empty((n, num_kv, group, d), np.float32)
    for seq in range(batch.num_seqs):
        start, end = batch.query_start_loc[seq], batch.query_start_loc[seq + 1]
        k_ctx, v_ctx = kv.read(layer_index, batch.block_tables[seq], int(batch.context_lens[seq]))
        for t in range(start, end):
            length = int(batch.positions[t]) + 1
            q_t = np.ascontiguousarray(q[t].reshape(num_kv, group, d))
            out[t] = attend_one_query(q_t, k_ctx[:, :length], v_ctx[:, :length])
    return linear(out.reshape(n, num_q * d), layer.o_weight, fp16_inputs=fp16_inputs)


def mlp(layer: LayerWeights, x: np.ndarray, fp16_inputs: bool = False) -> np.ndarray:
    """SwiGLU: down(silu(gate(x)) * up(x)); x # [n, hidden]."""
    gate_up = linear(x, layer.gate_up_weight, fp16_inputs=fp16_inputs)   # [n, 2 * intermediate]
    half = gate_up.shape[1] // 2
    return linear(silu(gate_up[:, :half]) * gate_up[:, half:], layer.down_weight, fp16_inputs=fp16_inputs)


def forward(weights: Qwen2Weights, kv: PagedKVCache, batch: StepBatch,
            logit_rows: np.ndarray) -> np.ndarray:
    """Run all layers over `batch` (writing its KV) and return logits of the tokens at `logit_rows`.

    logit_rows # [num_logits] indices into batch.input_ids -> logits # [num_logits, vocab] float32.
    """
    config = weights.config
    x = dequantize_rows(weights.token_embd, batch.input_ids).astype(np.float32)   # [n, hidden]
    cos, sin = rope_cos_sin(batch.positions, weights.inv_freq)
    for i, layer in enumerate(weights.layers):
        h = rms_norm(x, layer.attn_norm, config.rms_norm_eps)
        x = x + attention_block(layer, h, i, kv, batch, cos, sin, config, weights.fp16_operands)
        x = x + mlp(layer, rms_norm(x, layer.ffn_norm, config.rms_norm_eps), weights.fp16_operands)
    final = rms_norm(x[np.asarray(logit_rows, dtype=np.intp)], weights.output_norm, config.rms_norm_eps)
    return linear(final, weights.lm_head, fp16_inputs=weights.fp16_operands)
