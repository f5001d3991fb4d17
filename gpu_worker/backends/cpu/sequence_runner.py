"""Run sequences through any `Backend` without the engine: build StepBatches by hand.

For tests, tools and benchmarks that need the model but not scheduling (the engine in
gpu_worker/engine builds its own StepBatches). Blocks are handed out contiguously.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from gpu_worker.backends.base import Backend, SampleRequest, StepBatch
from gpu_worker.sampling.params import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


@dataclass(frozen=True)
class SequenceChunk:
    """One sequence's part of a step: `token_ids` at positions start_position, start_position + 1, ..."""

    token_ids: tuple[int, ...]
    start_position: int
    block_table: tuple[int, ...]          # block ids covering positions [0, end)
    sample: SampleRequest | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            raise ValueError("a chunk needs at least one token")
        if self.start_position < 0:
            raise ValueError(f"start_position must be >= 0, got {self.start_position}")

    @property
    def end_position(self) -> int:
        return self.start_position + len(self.token_ids)


def build_step(chunks: Sequence[SequenceChunk], block_size: int) -> StepBatch:
    """Concatenate chunks into one StepBatch (slots from each chunk's block table)."""
    positions = np.concatenate([np.arange(c.start_position, c.end_position) for c in chunks])
    slot_mapping = np.concatenate([
        np.asarray(c.block_table, np.int64)[np.arange(c.start_position, c.end_position) // block_size]
        * block_size + np.arange(c.start_position, c.end_position) % block_size
        for c in chunks])
    max_blocks = max(len(c.block_table) for c in chunks)
    block_tables = np.full((len(chunks), max_blocks), -1, np.int32)
    for i, c in enumerate(chunks):
        block_tables[i, :len(c.block_table)] = c.block_table
    return StepBatch(
        input_ids=np.concatenate([np.asarray(c.token_ids, np.int32) for c in chunks]),
        positions=positions.astype(np.int32),
        query_start_loc=np.concatenate([[0], np.cumsum([len(c.token_ids) for c in chunks])]).astype(np.int32),
        context_lens=np.array([c.end_position for c in chunks], np.int32),
        block_tables=block_tables,
        slot_mapping=slot_mapping.astype(np.int32),
        sample=tuple(c.sample for c in chunks),
    )


def blocks_for(first_block: int, num_tokens: int, block_size: int) -> tuple[int, ...]:
    """Contiguous block ids [first_block, ...) covering `num_tokens` positions."""
    return tuple(range(first_block, first_block + -(-num_tokens // block_size)))


def generate(backend: Backend, prompt_ids: Sequence[int], max_new_tokens: int, *,
             params: SamplingParams = GREEDY, stop_token_ids: Sequence[int] = (),
             block_size: int = 16, prefill_chunk: int = 0, first_block: int = 0) -> list[int]:
    """Generate up to `max_new_tokens` ids for one prompt (KV must already be allocated).

    prefill_chunk > 0 splits the prompt into chunks of that many tokens (one step each).
    """
    if max_new_tokens < 1 or not prompt_ids:
        raise ValueError("need a non-empty prompt and max_new_tokens >= 1")
    table = blocks_for(first_block, len(prompt_ids) + max_new_tokens, block_size)
    chunk = prefill_chunk if prefill_chunk > 0 else len(prompt_ids)
    seen, output = list(prompt_ids), []
    position = 0
    while position < len(prompt_ids):
        tokens = tuple(prompt_ids[position:position + chunk])
        is_last = position + len(tokens) == len(prompt_ids)
        request = _request(params, seen, output) if is_last else None
        result = backend.step(build_step([SequenceChunk(tokens, position, table, request)], block_size))
        position += len(tokens)
    while True:
        token = int(result.token_ids[0])
        output.append(token)
        seen.append(token)
        if token in stop_token_ids or len(output) == max_new_tokens:
            return output
        request = _request(params, seen, output)
        step = build_step([SequenceChunk((token,), len(seen) - 1, table, request)], block_size)
        result = backend.step(step)


def _request(params: SamplingParams, seen: list[int], output: list[int]) -> SampleRequest:
    return SampleRequest(params=params, step=len(output), seen_token_ids=np.asarray(seen, np.int32),
                         output_token_ids=np.asarray(output, np.int32))
