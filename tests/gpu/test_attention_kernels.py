"""GPU checks of the decode and prefill attention kernels over a paged fp16 KV cache (GQA 14/2)
against qwen2_reference.attend_one_query, and bitwise agreement of the two kernels."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.backends.cuda.ops.attention_decode import launch_attention_decode
from gpu_worker.backends.cuda.ops.attention_prefill import launch_attention_prefill, prefill_tiles
from gpu_worker.model.qwen2_reference import attend_one_query

pytestmark = pytest.mark.gpu
HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 16


def rel_error(out, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(out, np.float64) - expected) / np.linalg.norm(expected))


class PagedCase:
    """Random fp16 K/V in shuffled blocks; sequence i has context_lens[i] tokens and queries the
    last chunk_lens[i] of them."""

    def __init__(self, rng, context_lens, chunk_lens, num_blocks=160):
        self.context_lens, self.chunk_lens = list(context_lens), list(chunk_lens)
        self.k = (rng.standard_normal((num_blocks * BLOCK, KV_HEADS, DIM)) * 2).astype(np.float16)
        self.v = rng.standard_normal((num_blocks * BLOCK, KV_HEADS, DIM)).astype(np.float16)
        order = rng.permutation(num_blocks)
        width = max(-(-n // BLOCK) for n in context_lens) + 2
        self.tables = np.full((len(context_lens), width), -1, np.int32)
        used = 0
        for i, n in enumerate(context_lens):
            count = -(-n // BLOCK)
            self.tables[i, :count] = order[used:used + count]
            used += count
        self.positions = np.concatenate([np.arange(n - c, n) for n, c in zip(context_lens, chunk_lens)]).astype(np.int32)
        self.token_seq = np.repeat(np.arange(len(context_lens)), chunk_lens).astype(np.int32)
        self.query_start_loc = np.concatenate([[0], np.cumsum(chunk_lens)]).astype(np.int32)
        self.q = (rng.standard_normal((len(self.positions), HEADS, DIM)) * 2).astype(np.float32)

    def context(self, seq: int, length: int):
        slots = np.array([self.tables[seq, p // BLOCK] * BLOCK + p % BLOCK for p in range(length)])
        k = self.k[slots].astype(np.float32).transpose(1, 0, 2)   # [kv, L, dim]
        v = self.v[slots].astype(np.float32).transpose(1, 0, 2)
        return k, v

    def reference(self) -> np.ndarray:
        out = np.empty_like(self.q)
        group = HEADS // KV_HEADS
        for t, (seq, pos) in enumerate(zip(self.token_seq, self.positions)):
            k, v = self.context(int(seq), int(pos) + 1)
            out[t] = attend_one_query(self.q[t].reshape(KV_HEADS, group, DIM), k, v).reshape(HEADS, DIM)
        return out

    def device_args(self, gpu):
        tables = np.maximum(self.tables, 0)
        return (gpu.upload(self.q), gpu.upload(self.k), gpu.upload(self.v), gpu.upload(tables),
                gpu.upload(self.token_seq), gpu.upload(self.positions))


def run_decode(gpu, case):
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    out = gpu.poisoned(case.q.shape, np.float32)
    launch_attention_decode(gpu.device, q, out, k, v, tables, token_seq, positions, BLOCK)
    return gpu.download(out)


def run_prefill(gpu, case):
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    first, count = prefill_tiles(case.query_start_loc)
    out = gpu.poisoned(case.q.shape, np.float32)
    launch_attention_prefill(gpu.device, q, out, k, v, tables, token_seq, positions, BLOCK,
                             gpu.upload(first), gpu.upload(count))
    return gpu.download(out)


def test_decode_attention_matches_reference(gpu):
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[1, 31, 32, 33, 200, 777], chunk_lens=[1] * 6)
    out = run_decode(gpu, case)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5


def test_prefill_attention_matches_reference_and_decode_bitwise(gpu):
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[5, 40, 300, 129], chunk_lens=[5, 17, 45, 1])
    out = run_prefill(gpu, case)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5
    # The decode kernel runs any query token too: same arithmetic, so the same bits.
    assert np.array_equal(out, run_decode(gpu, case))


def test_prefill_chunking_does_not_change_outputs(gpu):
    rng = np.random.default_rng()
    whole = PagedCase(rng, context_lens=[150], chunk_lens=[150])
    out_whole = run_prefill(gpu, whole)
    # The same tokens split into chunks of 7 (as separate "sequences" sharing one block table).
    chunks = [7] * 21 + [3]
    split = PagedCase(rng, context_lens=[150], chunk_lens=[150])
    split.k, split.v, split.tables, split.q = whole.k, whole.v, whole.tables, whole.q
    split.query_start_loc = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32)
    assert np.array_equal(run_prefill(gpu, split), out_whole)


def test_attention_rejects_head_dim_other_than_64(gpu):
    case = PagedCase(np.random.default_rng(), [4], [1])
    q = gpu.upload(np.zeros((1, HEADS, 32), np.float32))
    _, k, v, tables, token_seq, positions = case.device_args(gpu)
    with pytest.raises(ValueError, match="head_dim"):
        launch_attention_decode(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK)
