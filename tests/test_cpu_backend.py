"""The cpu backend: batch invariance (bitwise), chunked prefill, sampling, KV accounting, bad batches.

Bitwise, because the serving tests compare 16 concurrent streams with the same requests run alone.
The scenario runs on the tiny synthetic model (fast) and on the real model (the BLAS shapes that
matter in production).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from gpu_worker.backends.base import SampleRequest
from gpu_worker.backends.cpu import CpuBackend
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step, generate
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.qwen2_reference import ROW_TILE, linear
from gpu_worker.sampling.params import SamplingParams

BLOCK_SIZE = 16
PROMPT_LENGTHS = (3, 11, 17, 1, 24)     # five sequences of different lengths, some over a block
SPLIT_PROMPTS = {1: 6, 4: 5}            # in the batched run these prefill in two chunks (first length)
NUM_DECODE = 2
Result = tuple[np.ndarray, int]         # (logits # [vocab], sampled token id) of one sampled step


def make_prompts(vocab_size: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(7)
    return [tuple(int(t) for t in rng.integers(0, min(vocab_size, 20000), n)) for n in PROMPT_LENGTHS]


def request(seq: int, prompt_len: int, seen: tuple[int, ...]) -> SampleRequest:
    """A different seeded sampler per sequence, so the sampled ids check the whole step output."""
    params = SamplingParams(temperature=0.7 + 0.1 * seq, top_k=40, seed=1000 + seq, top_logprobs=3)
    return SampleRequest(params, len(seen) - prompt_len, np.asarray(seen, np.int32),
                         np.asarray(seen[prompt_len:], np.int32))


def forced_token(seq: int, step: int) -> int:
    return 100 + 7 * seq + step


def run_step(backend: CpuBackend, chunks: list[SequenceChunk]) -> list[Result]:
    output, logits = backend.step_with_logits(build_step(chunks, BLOCK_SIZE))
    sampled = [i for i, c in enumerate(chunks) if c.sample is not None]
    return [(logits[row], int(output.token_ids[i])) for row, i in enumerate(sampled)]


def run_alone(backend: CpuBackend, prompt: tuple[int, ...], seq: int) -> list[Result]:
    """One-chunk prefill, then NUM_DECODE teacher-forced decode steps, the sequence alone."""
    backend.allocate_kv_cache(num_blocks=8, block_size=BLOCK_SIZE)
    table = blocks_for(3, len(prompt) + NUM_DECODE, BLOCK_SIZE)   # other block ids than the batched run
    seen = prompt
    results = run_step(backend, [SequenceChunk(prompt, 0, table, request(seq, len(prompt), seen))])
    for step in range(NUM_DECODE):
        seen = seen + (forced_token(seq, step),)
        chunk = SequenceChunk(seen[-1:], len(seen) - 1, table, request(seq, len(prompt), seen))
        results += run_step(backend, [chunk])
    return results


def next_chunk(seq: int, prompt: tuple[int, ...], done: int, table: tuple[int, ...]) -> SequenceChunk | None:
    """The chunk of sequence `seq` once `done` tokens are in its KV (None when finished)."""
    if done < len(prompt):                                   # the rest of a split prompt
        return SequenceChunk(prompt[done:], done, table, request(seq, len(prompt), prompt))
    step = done - len(prompt)
    if step >= NUM_DECODE:
        return None
    seen = prompt + tuple(forced_token(seq, s) for s in range(step + 1))
    return SequenceChunk(seen[-1:], done, table, request(seq, len(prompt), seen))


def run_batched(backend: CpuBackend, prompts: list[tuple[int, ...]]) -> list[list[Result]]:
    """All five in the same steps; sequences 1 and 4 prefill in two chunks while others decode."""
    backend.allocate_kv_cache(num_blocks=64, block_size=BLOCK_SIZE)
    tables = [blocks_for(10 * s, len(p) + NUM_DECODE, BLOCK_SIZE) for s, p in enumerate(prompts)]
    running: dict[int, SequenceChunk] = {}
    for s, prompt in enumerate(prompts):
        first = prompt[:SPLIT_PROMPTS.get(s, len(prompt))]
        sample = request(s, len(prompt), prompt) if len(first) == len(prompt) else None
        running[s] = SequenceChunk(first, 0, tables[s], sample)
    results: list[list[Result]] = [[] for _ in prompts]
    while running:
        outputs = iter(run_step(backend, list(running.values())))
        following: dict[int, SequenceChunk] = {}
        for s, chunk in running.items():
            if chunk.sample is not None:
                results[s].append(next(outputs))
            after = next_chunk(s, prompts[s], chunk.end_position, tables[s])
            if after is not None:
                following[s] = after
        running = following
    return results


def assert_same(alone: list[list[Result]], batched: list[list[Result]]) -> None:
    worst = max(float(np.abs(a[0] - b[0]).max()) for x, y in zip(alone, batched) for a, b in zip(x, y))
    print(f"alone vs batched: max |d logits| = {worst:.3e}")
    for seq, (x, y) in enumerate(zip(alone, batched)):
        assert len(x) == len(y) == NUM_DECODE + 1
        for step, ((logits_a, token_a), (logits_b, token_b)) in enumerate(zip(x, y)):
            assert np.array_equal(logits_a, logits_b), f"sequence {seq} step {step}"
            assert token_a == token_b, f"sequence {seq} step {step}"


@pytest.fixture(scope="module")
def tiny_backend(tiny_model_path: Path) -> CpuBackend:
    return CpuBackend(load_gguf(tiny_model_path))


def test_linear_row_does_not_depend_on_its_tile_neighbours() -> None:
    """The BLAS property the design rests on, at the real model's FFN shape."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4864, 896), dtype=np.float32)
    row = rng.standard_normal((1, 896), dtype=np.float32)
    expected = linear(row, weight)[0]
    for num_rows in (2, ROW_TILE - 1, ROW_TILE, ROW_TILE + 3, 3 * ROW_TILE):
        x = rng.standard_normal((num_rows, 896), dtype=np.float32)
        at = int(rng.integers(num_rows))
        x[at] = row[0]
        assert np.array_equal(linear(x, weight)[at], expected), f"row {at} of {num_rows}"


def test_tiny_batched_and_chunked_equals_alone(tiny_backend: CpuBackend) -> None:
    prompts = make_prompts(tiny_backend.config.vocab_size)
    alone = [run_alone(tiny_backend, p, s) for s, p in enumerate(prompts)]
    assert_same(alone, run_batched(tiny_backend, prompts))


@pytest.mark.real_model
def test_real_model_batched_and_chunked_equals_alone(real_model_path: Path) -> None:
    backend = CpuBackend(load_gguf(real_model_path))
    prompts = make_prompts(backend.config.vocab_size)
    alone = [run_alone(backend, p, s) for s, p in enumerate(prompts)]
    assert_same(alone, run_batched(backend, prompts))


def test_greedy_generate_is_argmax_and_chunking_free(tiny_backend: CpuBackend) -> None:
    prompt = make_prompts(tiny_backend.config.vocab_size)[4]
    tiny_backend.allocate_kv_cache(num_blocks=8, block_size=BLOCK_SIZE)
    whole = generate(tiny_backend, prompt, 8)
    chunked = generate(tiny_backend, prompt, 8, prefill_chunk=5, first_block=4)
    assert whole == chunked
    tiny_backend.allocate_kv_cache(num_blocks=8, block_size=BLOCK_SIZE)
    table = blocks_for(0, len(prompt) + 1, BLOCK_SIZE)
    step = build_step([SequenceChunk(prompt, 0, table)], BLOCK_SIZE)
    assert whole[0] == int(np.argmax(tiny_backend.logits(step, np.array([len(prompt) - 1]))[0]))


def test_logprobs_come_back_only_where_sampled(tiny_backend: CpuBackend) -> None:
    tiny_backend.allocate_kv_cache(num_blocks=8, block_size=BLOCK_SIZE)
    prompts = make_prompts(tiny_backend.config.vocab_size)[:2]
    chunks = [SequenceChunk(prompts[0], 0, (0, 1), request(0, len(prompts[0]), prompts[0])),
              SequenceChunk(prompts[1], 0, (2, 3))]
    output = tiny_backend.step(build_step(chunks, BLOCK_SIZE))
    assert output.token_ids[1] == -1 and output.logprobs[1] is None
    first = output.logprobs[0]
    assert first is not None and first.token_id == output.token_ids[0] and len(first.top) == 3
    assert first.logprob <= 0.0 and first.top[0][1] >= first.logprob


def test_kv_accounting(tiny_backend: CpuBackend) -> None:
    config = tiny_backend.config
    fp16_k_and_v_per_token = config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    assert tiny_backend.kv_bytes_per_block(16) == 16 * fp16_k_and_v_per_token
    tiny_backend.allocate_kv_cache(num_blocks=5, block_size=16)
    assert tiny_backend.kv is not None and tiny_backend.kv.nbytes == tiny_backend.kv_bytes_per_block(16) * 5
    assert tiny_backend.weight_bytes > 0 and tiny_backend.name == "cpu"


def test_bad_batches_raise_value_error(tiny_backend: CpuBackend) -> None:
    tiny_backend.allocate_kv_cache(num_blocks=2, block_size=BLOCK_SIZE)
    good = build_step([SequenceChunk((1, 2, 3), 0, (0,), None)], BLOCK_SIZE)
    vocab = tiny_backend.config.vocab_size
    bad = {
        "token id": replace(good, input_ids=np.array([1, 2, vocab], np.int32)),
        "slot": replace(good, slot_mapping=np.array([0, 1, 99], np.int32)),
        "context": replace(good, context_lens=np.array([5], np.int32)),
        "block table": replace(good, block_tables=np.array([[7]], np.int32)),
        "query_start_loc": replace(good, query_start_loc=np.array([0, 2], np.int32)),
    }
    for what, batch in bad.items():
        with pytest.raises(ValueError):
            tiny_backend.step(batch)
        print(f"rejected bad {what}")


def test_step_before_allocate_raises(tiny_model_path: Path, tiny_backend: CpuBackend) -> None:
    fresh = CpuBackend(load_gguf(tiny_model_path), weights=tiny_backend.weights)
    with pytest.raises(RuntimeError):
        fresh.step(build_step([SequenceChunk((1, 2), 0, (0,), None)], BLOCK_SIZE))


def test_factory_builds_cpu_and_rejects_unknown_kinds(tiny_model_path: Path) -> None:
    from gpu_worker.backends.factory import create_backend, cuda_unavailable_reason

    model = load_gguf(tiny_model_path)
    assert isinstance(create_backend("cpu", model), CpuBackend)
    with pytest.raises(ValueError, match="backend must be one of"):
        create_backend("tpu", model)
    reason = cuda_unavailable_reason()
    if reason is not None:       # CI and laptops: auto must fall back to the cpu backend
        print(f"cuda unavailable: {reason}")
        assert isinstance(create_backend("auto", model), CpuBackend)
        with pytest.raises((ImportError, RuntimeError)):
            create_backend("cuda", model)
