"""GPU checks of cuda/attention.cu over a paged fp16 KV cache (GQA 14/2) against
qwen2_reference.attend_one_query, and that a query's output is bitwise the same alone, batched,
in any prompt chunk, in either block shape and in decode steps (its arithmetic depends on its
context length only)."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.backends.cuda.ops.attention import DecodeRope, launch_attention
from gpu_worker.backends.cuda.ops.rope_kv import QkvRows, RopeTables, launch_rope_kv, rope_tables_host
from gpu_worker.model.qwen2_reference import attend_one_query

from slot_order import assert_same_halves, slot_order_f16

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

    def reference(self, dtype=np.float32) -> np.ndarray:
        out = np.empty(self.q.shape, dtype)
        group = HEADS // KV_HEADS
        for t, (seq, pos) in enumerate(zip(self.token_seq, self.positions)):
            k, v = self.context(int(seq), int(pos) + 1)
            q = self.q[t].reshape(KV_HEADS, group, DIM).astype(dtype)
            out[t] = attend_one_query(q, k.astype(dtype), v.astype(dtype)).reshape(HEADS, DIM)
        return out

    def device_args(self, gpu):
        tables = np.maximum(self.tables, 0)
        return (gpu.upload(self.q), gpu.upload(self.k), gpu.upload(self.v), gpu.upload(tables),
                gpu.upload(self.token_seq), gpu.upload(self.positions))


def run_attention(gpu, case, out16=None, row_groups=None, head_parts=None):
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    out = gpu.poisoned(case.q.shape, np.float32)
    launch_attention(gpu.device, q, out, k, v, tables, token_seq, positions, BLOCK, out16=out16, row_groups=row_groups,
                     head_parts=head_parts)
    return gpu.download(out)


def lone_query(case, t):
    """Query t of `case` alone: a one-token batch over the same cache and block table."""
    lone = PagedCase(np.random.default_rng(), context_lens=[1], chunk_lens=[1])
    seq = int(case.token_seq[t])
    lone.k, lone.v, lone.tables = case.k, case.v, case.tables[[seq]]
    lone.positions, lone.token_seq = case.positions[[t]], np.zeros(1, np.int32)
    lone.q = case.q[[t]]
    return lone


@pytest.mark.parametrize("row_groups", [1, 2])
def test_every_query_gets_the_bits_it_gets_alone(gpu, row_groups):
    """Blocks of 1 or 2 warps of 16 (token, head) rows per split: runs that start at unaligned token
    indices, chunks of 1-17 tokens (rows of one warp with different contexts, tiles past some rows'
    contexts), contexts across tile and round boundaries, and padding-like tokens (sequence 0's
    position 0 again, as eager steps pad); each query's output equals its output alone (in a
    one-token launch with the group's heads spread over 7 blocks)."""
    rng = np.random.default_rng()
    lens = [1, 9, 33, 130, 260, 300, 517]
    chunks = [1, 9, 7, 17, 2, 1, 6]
    case = PagedCase(rng, context_lens=lens, chunk_lens=chunks, num_blocks=120)
    padding = 3
    case.positions = np.concatenate([case.positions, np.zeros(padding, np.int32)])
    case.token_seq = np.concatenate([case.token_seq, np.zeros(padding, np.int32)])
    case.q = (rng.standard_normal((len(case.positions), HEADS, DIM)) * 2).astype(np.float32)
    out = run_attention(gpu, case, row_groups=row_groups)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5
    lone = np.stack([run_attention(gpu, lone_query(case, t), row_groups=1, head_parts=HEADS // KV_HEADS)[0]
                     for t in range(len(case.positions))])
    assert np.array_equal(out, lone)


@pytest.mark.parametrize("row_groups", [1, 2])
def test_attention_writes_the_fp16_slot_copy_of_its_output(gpu, row_groups):
    """out16: o's operand, bitwise what f32_to_f16_slots would make of out, from both block shapes."""
    case = PagedCase(np.random.default_rng(), context_lens=[5, 70, 200], chunk_lens=[5, 3, 9], num_blocks=40)
    out16 = gpu.poisoned((len(case.positions), HEADS * DIM), np.float16)
    out = run_attention(gpu, case, out16=out16, row_groups=row_groups)
    assert not np.isnan(out).any()
    assert_same_halves(gpu.download(out16), slot_order_f16(out), "attention's fp16 copy")


def test_long_prompt_matches_reference_in_both_block_shapes(gpu):
    """One 600-token prompt (the prefill shape), both block shapes, bitwise; against the reference."""
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[600], chunk_lens=[600], num_blocks=40)
    out = run_attention(gpu, case, row_groups=2)
    assert np.array_equal(out, run_attention(gpu, case, row_groups=1))
    picked = [0, 1, 2, 3, 4, 127, 128, 129, 599]
    assert rel_error(out[picked], case.reference()[picked]) < 1e-5


def test_large_scores_keep_the_reference_accuracy(gpu):
    """q and K scaled up (scores of tens, as Qwen2's biased q/k give): the hi + lo split of q and
    of the weights keeps fp32 accuracy against a float64 reference (the fp32 reference itself is
    off by ~1e-6 there), where q rounded to fp16 alone is off by ~1e-3 (checked here, so the
    bound tells the two apart)."""
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[1, 77, 300, 1000], chunk_lens=[1, 1, 5, 1], num_blocks=120)
    case.q = (case.q * 5).astype(np.float32)
    case.k = (case.k.astype(np.float32) * 4).astype(np.float16)
    out = run_attention(gpu, case)
    assert not np.isnan(out).any()
    precise = case.reference(np.float64)
    assert rel_error(out, precise) < 1e-5
    case.q = case.q.astype(np.float16).astype(np.float32)
    assert rel_error(case.reference(np.float64), precise) > 1e-4


def test_attention_matches_reference(gpu):
    """Decode-like queries: contexts from 1 position (splits 1..3 empty) to many rounds of 4 tiles
    of 32 (128 positions), across every tile and round boundary."""
    rng = np.random.default_rng()
    lens = [1, 31, 32, 33, 64, 65, 96, 97, 127, 128, 129, 200, 256, 257, 777, 1100]
    case = PagedCase(rng, context_lens=lens, chunk_lens=[1] * len(lens), num_blocks=260)
    out = run_attention(gpu, case)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5


def test_prompt_chunks_match_reference_and_lone_queries_bitwise(gpu):
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[5, 40, 300, 129], chunk_lens=[5, 17, 45, 1])
    out = run_attention(gpu, case)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5
    # Each query alone (a batch of one) gives the same bits as inside the prompt batch.
    for t in (0, 4, 5, 21, 22, 60, 66):
        assert np.array_equal(run_attention(gpu, lone_query(case, t)), out[[t]]), f"query {t} alone differs"


def test_prefill_chunking_does_not_change_outputs(gpu):
    rng = np.random.default_rng()
    whole = PagedCase(rng, context_lens=[300], chunk_lens=[300])
    out_whole = run_attention(gpu, whole)
    # The same tokens in chunks of 7 (as separate "sequences" sharing one block table).
    chunks = [7] * 42 + [6]
    split = PagedCase(rng, context_lens=[300], chunk_lens=[300])
    split.k, split.v, split.q, split.positions = whole.k, whole.v, whole.q, whole.positions
    split.tables = np.repeat(whole.tables, len(chunks), axis=0)
    split.token_seq = np.repeat(np.arange(len(chunks)), chunks).astype(np.int32)
    assert np.array_equal(run_attention(gpu, split), out_whole)


def test_attention_rejects_a_block_shape_it_has_not(gpu):
    case = PagedCase(np.random.default_rng(), [4], [1])
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    with pytest.raises(ValueError, match="row_groups 3"):
        launch_attention(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK, row_groups=3)
    with pytest.raises(ValueError, match="head_parts 2"):
        launch_attention(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK, row_groups=1, head_parts=2)


def test_attention_rejects_head_dim_other_than_64(gpu):
    case = PagedCase(np.random.default_rng(), [4], [1])
    q = gpu.upload(np.zeros((1, HEADS, 32), np.float32))
    _, k, v, tables, token_seq, positions = case.device_args(gpu)
    with pytest.raises(ValueError, match="head_dim"):
        launch_attention(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK)


@pytest.mark.parametrize("row_groups", [1, 2])
@pytest.mark.parametrize("head_parts", [1, HEADS // KV_HEADS])
def test_decode_attention_with_rope_inside_equals_rope_kv_then_attention(gpu, row_groups, head_parts):
    """Decode steps skip rope_kv's launch: attention biases and rotates q/k/v from the q/k/v rows
    itself, stages the token's own K/V row without reading the cache, and writes it (one block per
    kv head writes, also when the group's heads are spread over 7 blocks). Against rope_kv +
    attention (in blocks of 1 or 2 row groups, as prompt chunks run): the same output bits and the
    same cache bytes; the own rows are poisoned in the cache first, so a read of them would show; a
    padding token (slot -1) writes nothing."""
    rng = np.random.default_rng()
    lens = [1, 32, 33, 128, 129, 300, 257]
    case = PagedCase(rng, context_lens=lens, chunk_lens=[1] * len(lens), num_blocks=200)
    q_width, kv_width = HEADS * DIM, KV_HEADS * DIM
    qkv = rng.standard_normal((len(lens), q_width + 2 * kv_width + 3), dtype=np.float32)   # 3 spare columns
    biases = [rng.standard_normal(n * DIM, dtype=np.float32) for n in (HEADS, KV_HEADS, KV_HEADS)]
    slots = np.array([case.tables[s, p // BLOCK] * BLOCK + p % BLOCK
                      for s, p in zip(case.token_seq, case.positions)], np.int32)
    slots[3] = -1   # padding: no KV write
    cos, sin = rope_tables_host(2048, DIM, 1e6)
    tables = RopeTables(gpu.upload(cos), gpu.upload(sin))
    _, _, _, block_tables, token_seq, positions = case.device_args(gpu)
    qkv_d, slots_d, biases_d = gpu.upload(qkv), gpu.upload(slots), tuple(gpu.upload(b) for b in biases)
    outputs, caches = [], []
    for fused in (False, True):
        k_host, v_host = case.k.copy(), case.v.copy()
        if fused:   # own rows unwritten: the kernel must neither read them nor leave them so
            k_host[slots[slots >= 0]] = np.nan
            v_host[slots[slots >= 0]] = np.nan
        k_cache, v_cache = gpu.upload(k_host), gpu.upload(v_host)
        q_out = gpu.poisoned(case.q.shape, np.float32)
        rows = QkvRows(q_in=qkv_d.ptr, k_in=qkv_d.ptr + 4 * q_width, v_in=qkv_d.ptr + 4 * (q_width + kv_width),
                       q_in_stride=qkv.shape[1], kv_in_stride=qkv.shape[1], q_out=q_out)
        rope = DecodeRope(rows, biases_d, tables, slots_d) if fused else None
        if not fused:
            launch_rope_kv(gpu.device, rows, biases_d, positions, slots_d, tables, k_cache, v_cache)
        out = gpu.poisoned(case.q.shape, np.float32)
        launch_attention(gpu.device, q_out, out, k_cache, v_cache, block_tables, token_seq, positions, BLOCK,
                         rope=rope, row_groups=None if fused else row_groups,
                         head_parts=head_parts if fused else None)
        outputs.append(gpu.download(out))
        caches.append((gpu.download(k_cache), gpu.download(v_cache)))
    real = slots >= 0
    assert not np.isnan(outputs[1][real]).any()
    np.testing.assert_array_equal(outputs[1][real], outputs[0][real])
    for unfused_cache, fused_cache in zip(*caches):
        np.testing.assert_array_equal(fused_cache, unfused_cache)   # the padding token's slot was never its own
