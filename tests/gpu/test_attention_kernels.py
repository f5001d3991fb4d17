"""GPU checks of cuda/attention.cu over a paged fp16 KV cache (GQA 14/2) against
qwen2_reference.attend_one_query, and that a query's output is bitwise the same alone, batched
or in any prompt chunk (its arithmetic depends on its context length only)."""
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


def run_attention(gpu, case, heads_per_block=None, query_tiles=None, out16=None, register_capped=None):
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    out = gpu.poisoned(case.q.shape, np.float32)
    launch_attention(gpu.device, q, out, k, v, tables, token_seq, positions, BLOCK, heads_per_block=heads_per_block,
                     query_tiles=query_tiles, out16=out16, register_capped=register_capped)
    return gpu.download(out)


@pytest.mark.parametrize("heads_per_block", [1, HEADS // KV_HEADS])
def test_the_register_capped_build_gives_the_same_bits(gpu, heads_per_block):
    """attention_f32_two_blocks_per_sm (decode steps of many sequences) is attention_f32 built for two
    blocks per multiprocessor: the same output bits, prompt chunks and lone queries alike."""
    case = PagedCase(np.random.default_rng(), context_lens=[1, 40, 129, 300, 700], chunk_lens=[1, 9, 1, 4, 1],
                     num_blocks=200)
    capped = run_attention(gpu, case, heads_per_block, query_tiles=False, register_capped=True)
    assert not np.isnan(capped).any()
    assert np.array_equal(capped, run_attention(gpu, case, heads_per_block, query_tiles=False, register_capped=False))
    assert rel_error(capped, case.reference()) < 1e-5


@pytest.mark.parametrize("query_tiles", [True, False])
def test_attention_writes_the_fp16_slot_copy_of_its_output(gpu, query_tiles):
    """out16: o's operand, bitwise what f32_to_f16_slots would make of out, from both kernels."""
    case = PagedCase(np.random.default_rng(), context_lens=[5, 70, 200], chunk_lens=[5, 3, 9], num_blocks=40)
    out16 = gpu.poisoned((len(case.positions), HEADS * DIM), np.float16)
    out = run_attention(gpu, case, query_tiles=query_tiles, out16=out16)
    assert not np.isnan(out).any()
    assert_same_halves(gpu.download(out16), slot_order_f16(out), "attention's fp16 copy")


@pytest.mark.parametrize("heads_per_block", [1, HEADS // KV_HEADS])
def test_query_tiles_give_the_bits_of_one_block_per_token(gpu, heads_per_block):
    """attention_tiles_f32 (up to 4 consecutive tokens of a sequence per block) against
    attention_f32 (a block per token): runs that start at unaligned token indices, chunks of 1-9
    tokens, contexts across tile and round boundaries, and padding-like tokens (sequence 0's
    position 0 again, as eager steps pad)."""
    rng = np.random.default_rng()
    lens = [1, 9, 33, 130, 260, 300, 517]
    chunks = [1, 9, 7, 5, 2, 1, 6]
    case = PagedCase(rng, context_lens=lens, chunk_lens=chunks, num_blocks=120)
    padding = 3
    case.positions = np.concatenate([case.positions, np.zeros(padding, np.int32)])
    case.token_seq = np.concatenate([case.token_seq, np.zeros(padding, np.int32)])
    case.q = (rng.standard_normal((len(case.positions), HEADS, DIM)) * 2).astype(np.float32)
    tiled = run_attention(gpu, case, heads_per_block, query_tiles=True)
    assert not np.isnan(tiled).any()
    assert np.array_equal(tiled, run_attention(gpu, case, heads_per_block, query_tiles=False))
    assert rel_error(tiled, case.reference()) < 1e-5


def test_long_prompt_query_tiles_match_one_block_per_token(gpu):
    """One 600-token prompt (the prefill shape the tiles are for), both kernels, bitwise."""
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[600], chunk_lens=[600], num_blocks=40)
    tiled = run_attention(gpu, case, query_tiles=True)
    assert np.array_equal(tiled, run_attention(gpu, case, query_tiles=False))
    picked = [0, 1, 2, 3, 4, 127, 128, 129, 599]
    assert rel_error(tiled[picked], case.reference()[picked]) < 1e-5


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
        lone = PagedCase(rng, context_lens=[1], chunk_lens=[1])
        seq = int(case.token_seq[t])
        lone.k, lone.v, lone.tables = case.k, case.v, case.tables[[seq]]
        lone.positions, lone.token_seq = case.positions[[t]], np.zeros(1, np.int32)
        lone.q = case.q[[t]]
        assert np.array_equal(run_attention(gpu, lone), out[[t]]), f"query {t} alone differs"


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


@pytest.mark.parametrize("heads_per_block", [1, HEADS // KV_HEADS])
def test_every_heads_per_block_gives_the_same_bits(gpu, heads_per_block):
    """One query head per block (few tokens) or the whole GQA group (many): the same values, in
    the same order of operations, so bitwise the same output; and both match the reference."""
    rng = np.random.default_rng()
    case = PagedCase(rng, context_lens=[1, 33, 129, 300, 700], chunk_lens=[1, 1, 20, 1, 3], num_blocks=200)
    out = run_attention(gpu, case, heads_per_block)
    assert not np.isnan(out).any()
    assert rel_error(out, case.reference()) < 1e-5
    other = HEADS // KV_HEADS if heads_per_block == 1 else 1
    assert np.array_equal(out, run_attention(gpu, case, other))


def test_attention_rejects_heads_per_block_that_does_not_divide_the_group(gpu):
    case = PagedCase(np.random.default_rng(), [4], [1])
    q, k, v, tables, token_seq, positions = case.device_args(gpu)
    with pytest.raises(ValueError, match="heads_per_block 2"):
        launch_attention(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK, heads_per_block=2)


def test_attention_rejects_head_dim_other_than_64(gpu):
    case = PagedCase(np.random.default_rng(), [4], [1])
    q = gpu.upload(np.zeros((1, HEADS, 32), np.float32))
    _, k, v, tables, token_seq, positions = case.device_args(gpu)
    with pytest.raises(ValueError, match="head_dim"):
        launch_attention(gpu.device, q, q, k, v, tables, token_seq, positions, BLOCK)


@pytest.mark.parametrize("heads_per_block", [1, HEADS // KV_HEADS])
def test_decode_attention_with_rope_inside_equals_rope_kv_then_attention(gpu, heads_per_block):
    """Decode steps skip rope_kv's launch: attention biases and rotates q/k/v from the q/k/v rows
    itself, stages the token's own K/V row without reading the cache, and one block per GQA group
    writes it. Against rope_kv + attention: the same output bits and the same cache bytes; the own
    rows are poisoned in the cache first, so a read of them would show; a padding token (slot -1)
    writes nothing."""
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
                         heads_per_block=heads_per_block, rope=rope)
        outputs.append(gpu.download(out))
        caches.append((gpu.download(k_cache), gpu.download(v_cache)))
    real = slots >= 0
    assert not np.isnan(outputs[1][real]).any()
    np.testing.assert_array_equal(outputs[1][real], outputs[0][real])
    for unfused_cache, fused_cache in zip(*caches):
        np.testing.assert_array_equal(fused_cache, unfused_cache)   # the padding token's slot was never its own
