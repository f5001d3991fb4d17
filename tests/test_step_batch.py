"""build_step_batch (vectorized) against a plain per-chunk construction, over engine runs that mix
prompt chunks, decodes, prefix-cache hits and preemptions."""
from __future__ import annotations

import random

import numpy as np

from gpu_worker.backends.base import Backend, StepBatch, StepOutput, TokenLogprobs
from gpu_worker.engine.engine import Engine, build_step_batch
from gpu_worker.engine.scheduler import ScheduledChunk
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.sampling.params import SamplingParams, StoppingParams


def reference_step_batch(chunks: list[ScheduledChunk], block_size: int) -> StepBatch:
    """The straightforward construction: one small array per chunk, then concatenated."""
    lens = [c.num_tokens for c in chunks]
    query_start_loc = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    input_ids = np.concatenate([c.seq.token_ids[c.start:c.start + c.num_tokens] for c in chunks])
    positions = np.concatenate([np.arange(c.start, c.start + c.num_tokens, dtype=np.int32) for c in chunks])
    block_tables = np.full((len(chunks), max(len(c.seq.block_table) for c in chunks)), -1, np.int32)
    for i, c in enumerate(chunks):
        block_tables[i, :len(c.seq.block_table)] = c.seq.block_table
    seq_index = np.repeat(np.arange(len(chunks)), lens)
    slot_mapping = (block_tables[seq_index, positions // block_size] * block_size
                    + positions % block_size).astype(np.int32)
    context_lens = np.array([c.start + c.num_tokens for c in chunks], np.int32)
    return StepBatch(input_ids, positions, query_start_loc, context_lens, block_tables, slot_mapping, ())


class CheckingBackend(Backend):
    """Checks each batch and its sample views; token i+1 = a fixed function of token i."""

    name = device_name = "checking"
    weight_bytes = 0

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.engine: Engine | None = None
        self.num_checked = 0

    def kv_bytes_per_block(self, block_size: int) -> int:
        return 1

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        pass

    def step(self, batch: StepBatch) -> StepOutput:
        assert self.engine is not None
        batch.check(1000, self.engine.block_manager.num_blocks, self.block_size)
        last = batch.query_start_loc[1:] - 1
        tokens = ((batch.input_ids[last].astype(np.int64) * 31 + batch.positions[last]) % 997).astype(np.int32)
        for i, request in enumerate(batch.sample):
            if request is None:
                tokens[i] = -1
            else:
                assert not request.seen_token_ids.flags.writeable
                assert request.output_token_ids.tolist() == request.seen_token_ids[
                    len(request.seen_token_ids) - request.step:].tolist()
        self.num_checked += 1
        return StepOutput(tokens, (None,) * batch.num_seqs)


def test_build_step_batch_equals_the_per_chunk_construction() -> None:
    rng = random.Random(0)
    for num_blocks, block_size, max_batch, budget in ((40, 4, 16, 64), (400, 16, 64, 512), (12, 4, 4, 16)):
        backend = CheckingBackend(block_size)
        engine = Engine(backend, num_blocks, block_size, max_batch, budget, context_length=200,
                        eos_token_ids=(5,), vocab_size=1000)
        backend.engine = engine
        num_preempted = 0
        shared = [rng.randrange(1000) for _ in range(40)]
        for key in range(1, 60):
            prompt = shared[:rng.randrange(0, 40)] + [rng.randrange(1000) for _ in range(rng.randrange(1, 50))]
            engine.add_request(RequestSpec(key, tuple(prompt), SamplingParams(temperature=0.0),
                                           StoppingParams(max_tokens=rng.randrange(1, 40))))
        while engine.has_work:
            plan = engine.scheduler.schedule()
            num_preempted += len(plan.preempted)
            if not plan.chunks:
                continue
            got = build_step_batch(plan.chunks, block_size)
            want = reference_step_batch(plan.chunks, block_size)
            for name in ("input_ids", "positions", "query_start_loc", "context_lens", "block_tables",
                         "slot_mapping"):
                a, b = getattr(got, name), getattr(want, name)
                assert a.dtype == b.dtype and np.array_equal(a, b), name
            samples = [c.start + c.num_tokens == c.seq.num_tokens for c in plan.chunks]
            assert [r is not None for r in got.sample] == samples
            output = backend.step(got)
            engine._postprocess(plan.chunks, output)
            engine.check_invariants()
        assert backend.num_checked > 0 and (num_preempted > 0 or num_blocks == 400)


def test_step_output_of_sampled_places_each_draw_in_its_sequence_row() -> None:
    logprobs = TokenLogprobs(7, -0.5, ((7, -0.5), (3, -1.0)))
    out = StepOutput.of_sampled(4, [1, 3], [7, 9], [logprobs, None])
    assert out.token_ids.dtype == np.int32 and out.token_ids.tolist() == [-1, 7, -1, 9]
    assert out.logprobs == (None, logprobs, None, None)
    assert StepOutput.of_sampled(2, [], [], []).token_ids.tolist() == [-1, -1]
