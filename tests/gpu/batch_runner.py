"""Runs many sequences together through a Backend (prefill in chunks, then decode), for the GPU
tests and the GPU benchmark. Sequences get disjoint contiguous blocks; no scheduler."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from gpu_worker.backends.base import SampleRequest
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step
from gpu_worker.sampling.params import SamplingParams


@dataclass
class RunningSeq:
    prompt: list[int]
    params: SamplingParams
    table: tuple[int, ...]
    computed: int = 0
    output: list[int] = field(default_factory=list)

    def request(self) -> SampleRequest:
        return SampleRequest(params=self.params, step=len(self.output),
                             seen_token_ids=np.asarray(self.prompt + self.output, np.int32),
                             output_token_ids=np.asarray(self.output, np.int32))


def run_batch(backend, prompts: list[list[int]], params: list[SamplingParams], max_new_tokens: int,
              block_size: int = 16, prefill_chunk: int = 0, first_block: int = 0) -> list[list[int]]:
    """All sequences step together: prompts prefill in chunks of `prefill_chunk` tokens (0 = whole),
    then one decode token per sequence per step, until each has max_new_tokens."""
    seqs, block = [], first_block
    for prompt, p in zip(prompts, params):
        table = blocks_for(block, len(prompt) + max_new_tokens, block_size)
        block += len(table)
        seqs.append(RunningSeq(list(prompt), p, table))
    while any(len(s.output) < max_new_tokens for s in seqs):
        active = [s for s in seqs if len(s.output) < max_new_tokens]
        chunks = [_next_chunk(s, prefill_chunk) for s in active]
        result = backend.step(build_step(chunks, block_size))
        for s, chunk, token in zip(active, chunks, result.token_ids):
            s.computed = chunk.end_position
            if chunk.sample is not None:
                s.output.append(int(token))
    return [s.output for s in seqs]


def _next_chunk(s: RunningSeq, prefill_chunk: int) -> SequenceChunk:
    if s.computed < len(s.prompt):
        size = prefill_chunk or len(s.prompt)
        tokens = tuple(s.prompt[s.computed:s.computed + size])
        last = s.computed + len(tokens) == len(s.prompt)
        return SequenceChunk(tokens, s.computed, s.table, s.request() if last else None)
    return SequenceChunk((s.output[-1],), s.computed, s.table, s.request())
