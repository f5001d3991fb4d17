"""The engine loop body: step() = schedule -> backend.step(StepBatch) -> postprocess.

Single-threaded and synchronous: the worker calls add_request/abort between steps, so an abort
takes effect before the next step and frees the request's KV at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpu_worker.backends.base import Backend, SampleRequest, StepBatch, StepOutput, TokenLogprobs
from gpu_worker.engine.block_manager import KVBlockManager
from gpu_worker.engine.scheduler import ScheduledChunk, Scheduler
from gpu_worker.engine.sequence import RequestSpec, Sequence


class TokenOut(NamedTuple):
    """One new token of a request (EOS / stop ids that end it are not emitted). A NamedTuple, not
    a frozen dataclass: one is built per token (256 per decode step), at half the cost."""

    request_key: int
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass(frozen=True)
class FinishOut:
    request_key: int
    reason: str                # eos | length | stop | cancelled | error
    prompt_tokens: int
    completion_tokens: int     # emitted tokens
    queue_ns: int
    ttft_ns: int
    decode_ns: int
    message: str = ""


EngineEvent = TokenOut | FinishOut


class Engine:
    def __init__(self, backend: Backend, num_blocks: int, block_size: int, max_batch: int,
                 max_tokens_per_step: int, context_length: int, eos_token_ids: tuple[int, ...],
                 vocab_size: int, prefix_caching: bool = True) -> None:
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2, got {context_length}")
        self.backend = backend
        self.block_manager = KVBlockManager(num_blocks, block_size, prefix_caching)
        self.scheduler = Scheduler(self.block_manager, max_batch, max_tokens_per_step)
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.default_eos_ids = frozenset(eos_token_ids)
        self._seqs: dict[int, Sequence] = {}
        self.num_steps = 0
        self.num_generated_tokens = 0
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def add_request(self, spec: RequestSpec) -> list[EngineEvent]:
        """Queue a request; a duplicate key or an over-long prompt finishes at once with an error."""
        if spec.request_key in self._seqs:
            return [self._error_finish(spec, f"request key {spec.request_key} already in flight")]
        if len(spec.prompt_token_ids) >= self.context_length:
            return [self._error_finish(spec, f"prompt of {len(spec.prompt_token_ids)} tokens leaves no room "
                                             f"in the context of {self.context_length}")]
        bad = [t for t in spec.prompt_token_ids if not 0 <= t < self.vocab_size]
        bad += [t for t, _ in spec.sampling.logit_bias if not 0 <= t < self.vocab_size]
        if bad:
            return [self._error_finish(spec, f"token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")]
        seq = Sequence(spec, default_eos_ids=self.default_eos_ids)
        self._seqs[spec.request_key] = seq
        self.scheduler.add(seq)
        return []

    def abort(self, request_key: int) -> list[EngineEvent]:
        seq = self._seqs.get(request_key)
        if seq is None:
            return []
        self.scheduler.finish(seq, "cancelled")
        return [self._finish_event(seq)]

    def abort_all(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for key in list(self._seqs):
            events += self.abort(key)
        return events

    def step(self) -> list[EngineEvent]:
        plan = self.scheduler.schedule()
        events: list[EngineEvent] = [self._finish_event(s) for s in plan.finished]
        self.num_preemptions += len(plan.preempted)
        if not plan.chunks:
            return events
        now = time.monotonic_ns()
        for chunk in plan.chunks:
            if chunk.seq.first_scheduled_ns is None:
                chunk.seq.first_scheduled_ns = now
        batch = build_step_batch(plan.chunks, self.block_manager.block_size)
        try:
            output = self.backend.step(batch)
        except Exception as exc:  # noqa: BLE001 -- a failed step must not take the worker down: fail its requests
            for chunk in plan.chunks:
                self.scheduler.finish(chunk.seq, "error", f"backend step failed: {exc!r}")
                events.append(self._finish_event(chunk.seq))
            return events
        self.num_steps += 1
        events += self._postprocess(plan.chunks, output)
        return events

    def _postprocess(self, chunks: list[ScheduledChunk], output: StepOutput) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        now = time.monotonic_ns()
        token_ids = output.token_ids.tolist()        # [num_seqs] ints, one conversion per step
        logprobs = output.logprobs
        cache_full_blocks = self.block_manager.cache_full_blocks
        for i, (seq, num_tokens, start) in enumerate(chunks):
            seq.num_computed_tokens += num_tokens
            cache_full_blocks(seq)                       # before a finish frees them
            if start + num_tokens != seq.num_tokens:
                continue                                 # a prompt chunk that samples nothing
            token_id = token_ids[i]
            if token_id < 0:
                raise RuntimeError(f"backend sampled nothing for request {seq.key} that asked for a token")
            seq.append_token(token_id)
            self.num_generated_tokens += 1
            if seq.first_token_ns is None:
                seq.first_token_ns = now
            reason = self._finish_reason(seq, token_id)
            if reason not in ("eos", "stop"):
                events.append(TokenOut(seq.key, token_id, logprobs[i]))
            if reason is not None:
                self.scheduler.finish(seq, reason)
                events.append(self._finish_event(seq))
        return events

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        if token_id in seq.stop_ids:
            return "stop"
        if token_id in seq.eos_ids:                      # empty with ignore_eos
            return "eos"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.context_length:
            return "length"
        return None

    def _finish_event(self, seq: Sequence) -> FinishOut:
        self._seqs.pop(seq.key, None)
        seq.finished_ns = seq.finished_ns or time.monotonic_ns()
        queue_ns, ttft_ns, decode_ns = seq.timings_ns()
        completion = seq.num_output_tokens - (1 if seq.finish_reason in ("eos", "stop") else 0)
        return FinishOut(seq.key, seq.finish_reason or "error", seq.num_prompt_tokens, completion,
                         queue_ns, ttft_ns, decode_ns, seq.error_message)

    def _error_finish(self, spec: RequestSpec, message: str) -> FinishOut:
        return FinishOut(spec.request_key, "error", len(spec.prompt_token_ids), 0, 0, 0, 0, message)

    def stats(self) -> dict[str, int]:
        bm = self.block_manager
        return {"kv_blocks_total": bm.num_blocks, "kv_blocks_used": bm.num_used_blocks,
                "kv_blocks_free": bm.num_free_blocks, "block_size": bm.block_size,
                "running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "steps": self.num_steps, "generated_tokens": self.num_generated_tokens,
                "preemptions": self.num_preemptions, "prefix_caching": int(bm.prefix_caching),
                "kv_blocks_cached": bm.num_cached_blocks, "prefix_cache_hit_tokens": bm.num_prefix_hit_tokens,
                "prefix_cache_query_tokens": bm.num_prefix_query_tokens,
                "prefix_cache_evicted_blocks": bm.num_evicted_blocks}

    def check_invariants(self) -> None:
        """Block accounting against every live sequence (tests call it every step)."""
        self.block_manager.check_invariants(self.scheduler.running + list(self.scheduler.waiting))


def build_step_batch(chunks: list[ScheduledChunk], block_size: int) -> StepBatch:
    """Flatten scheduled chunks into the backend's explicit batch (shapes in base.StepBatch).

    One Python pass gathers per-chunk scalars, block ids and sample requests; the per-token and
    per-block arrays are then built with whole-array numpy operations (a decode step has 256
    chunks of one token, so per-chunk numpy calls would dominate)."""
    num_seqs = len(chunks)
    lens: list[int] = []
    starts: list[int] = []
    widths: list[int] = []
    flat_blocks: list[int] = []            # every block table, one after the other
    sample: list[SampleRequest | None] = []
    for seq, num_tokens, start in chunks:
        lens.append(num_tokens)
        starts.append(start)
        widths.append(len(seq.block_table))
        flat_blocks += seq.block_table
        if start + num_tokens == seq.num_tokens:       # reaches the last token: sample a new one
            sample.append(SampleRequest(seq.spec.sampling, seq.num_output_tokens, seq.token_ids,
                                        seq.output_token_ids))
        else:
            sample.append(None)
    lens_array = np.array(lens, dtype=np.int32)                                 # [num_seqs]
    starts_array = np.array(starts, dtype=np.int32)                             # [num_seqs]
    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int32)
    np.cumsum(lens_array, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    if num_tokens == num_seqs:         # one token each (a decode step): ints, not 256 tiny arrays
        input_ids = np.array([c.seq.token_id(c.start) for c in chunks], dtype=np.int32)
    else:
        input_ids = np.concatenate([c.seq.token_slice(c.start, c.start + c.num_tokens) for c in chunks])
    # Token j of sequence i sits at position starts[i] + (j - query_start_loc[i]).
    seq_index = np.repeat(np.arange(num_seqs), lens_array)                      # [num_tokens]
    positions = (np.arange(num_tokens, dtype=np.int32)
                 + (starts_array - query_start_loc[:-1])[seq_index])            # [num_tokens]
    # Boolean-mask assignment fills row-major, i.e. table after table.
    widths_array = np.array(widths)                                             # [num_seqs]
    block_tables = np.full((num_seqs, max(widths)), -1, dtype=np.int32)        # [num_seqs, max_blocks]
    block_tables[np.arange(block_tables.shape[1]) < widths_array[:, None]] = np.array(flat_blocks, np.int32)
    slot_mapping = (block_tables[seq_index, positions // block_size] * block_size
                    + positions % block_size).astype(np.int32)
    return StepBatch(input_ids=input_ids, positions=positions, query_start_loc=query_start_loc,
                     context_lens=starts_array + lens_array, block_tables=block_tables,
                     slot_mapping=slot_mapping, sample=tuple(sample))
