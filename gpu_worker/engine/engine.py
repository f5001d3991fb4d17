"""The engine loop body: step() = schedule -> backend.submit(StepBatch) -> collect -> postprocess.

Single-threaded: the worker calls add_request/abort between steps, so an abort takes effect before
the next step and frees the request's KV at once.

Overlapped decode (backends with supports_overlap, i.e. cuda): in a steady decode phase (every
running sequence decoding, nobody waiting, no penalties or logit bias) step() submits decode step
N + 1 before it reads step N's tokens, so the host's postprocessing, event publishing and next
batch building run while the GPU computes. Step N + 1 feeds each sequence the token step N
sampled for it straight from the device. A sequence that step N ends by length is left out of
step N + 1; one that step N ends otherwise (EOS, stop id, abort) had a wasted row in step N + 1,
whose output for it is dropped, and is left out of step N + 2. Its blocks are freed at once,
which is safe because every later step runs after step N + 1 on the device. Outputs are those of
the synchronous engine: a sequence's tokens do not depend on the batch it is in (batch
invariance), and events come in the same order.
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


_NO_TOKENS = np.zeros(0, np.int32)
_NO_TOKENS.flags.writeable = False


class _Submitted(NamedTuple):
    """A step handed to the backend and not collected yet."""

    chunks: list[ScheduledChunk]
    handle: object


class Engine:
    def __init__(self, backend: Backend, num_blocks: int, block_size: int, max_batch: int,
                 max_tokens_per_step: int, context_length: int, eos_token_ids: tuple[int, ...],
                 vocab_size: int, prefix_caching: bool = True, overlap: bool = True) -> None:
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
        self.overlap = overlap and backend.supports_overlap
        self.num_overlapped_steps = 0
        self._inflight: _Submitted | None = None    # the decode step submitted ahead (overlap)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._inflight is not None

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
        events: list[EngineEvent] = []
        current, self._inflight = self._inflight, None
        if current is None:
            plan = self.scheduler.schedule()
            events += [self._finish_event(s) for s in plan.finished]
            self.num_preemptions += len(plan.preempted)
            if not plan.chunks:
                return events
            now = time.monotonic_ns()
            for chunk in plan.chunks:
                if chunk.seq.first_scheduled_ns is None:
                    chunk.seq.first_scheduled_ns = now
            current = self._submit(plan.chunks, build_step_batch(plan.chunks, self.block_manager.block_size), events)
            if current is None:
                return events
        # A step ahead that fails to start fails its requests after this step's tokens, as the
        # synchronous engine's next step would.
        failed_ahead: list[tuple[list[ScheduledChunk], Exception]] = []
        if self.overlap:
            self._inflight = self._submit_next_decode(current.chunks, failed_ahead)
        try:
            output = self.backend.collect(current.handle)
        except Exception as exc:  # noqa: BLE001 -- a failed step must not take the worker down: fail its requests
            events += self._fail(current.chunks, exc)
        else:
            self.num_steps += 1
            events += self._postprocess(current.chunks, output)
        for chunks, exc in failed_ahead:
            events += self._fail(chunks, exc)
        return events

    def _submit(self, chunks: list[ScheduledChunk], batch: StepBatch, events: list[EngineEvent]) -> _Submitted | None:
        try:
            handle = self.backend.submit(batch)
        except Exception as exc:  # noqa: BLE001 -- as in step(): fail the step's requests, keep serving
            events += self._fail(chunks, exc)
            return None
        return _Submitted(chunks, handle)

    def _fail(self, chunks: list[ScheduledChunk], exc: Exception) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        for chunk in chunks:
            if not chunk.seq.is_finished:      # an overlapped step repeats the sequences of the one before
                self.scheduler.finish(chunk.seq, "error", f"backend step failed: {exc!r}")
                events.append(self._finish_event(chunk.seq))
        return events

    def _submit_next_decode(self, chunks: list[ScheduledChunk],
                            failed: list[tuple[list[ScheduledChunk], Exception]]) -> _Submitted | None:
        """Submits the decode step after `chunks` (not yet collected) when the overlap rule in the
        module docstring holds: `chunks` is a decode step, every running sequence is in it, and
        none uses penalties or a logit bias (their sample inputs would need the token in flight).
        Left out of the step ahead: sequences of `chunks` that have finished since, and those that
        their token in flight will end by length."""
        running = self.scheduler.running
        if self.scheduler.waiting or not running:
            return None
        row_of: dict[Sequence, int] = {}   # Sequence hashes by identity
        for row, (seq, num_tokens, start) in enumerate(chunks):
            if num_tokens != 1 or start + 1 != seq.num_tokens:
                return None
            row_of[seq] = row
        bm = self.block_manager
        rows: list[int] = []
        going_on: list[Sequence] = []
        growing: list[Sequence] = []       # those whose position num_tokens starts a new block
        for seq in running:
            row = row_of.get(seq)
            if row is None:
                return None
            if seq.needs_host_sampling_inputs:
                return None
            if seq.num_output_tokens + 1 >= seq.max_tokens or seq.num_tokens + 1 >= self.context_length:
                continue                   # its token in flight ends it (length): not in the step ahead
            rows.append(row)
            going_on.append(seq)
            if len(seq.block_table) * bm.block_size <= seq.num_tokens:
                growing.append(seq)
        if not going_on or len(growing) > bm.num_free_blocks:
            return None
        for seq in growing:                # the others' blocks already hold position num_tokens
            bm.allocate(seq, 2)            # KV through position num_tokens (num_computed + 2 tokens)
        next_chunks = [ScheduledChunk(seq, 1, seq.num_tokens) for seq in going_on]
        try:
            handle = self.backend.submit(build_next_decode_batch(going_on, bm.block_size),
                                         previous_rows=np.array(rows, np.int32))
        except Exception as exc:  # noqa: BLE001 -- failed after the current step's tokens (step())
            failed.append((next_chunks, exc))
            return None
        self.num_overlapped_steps += 1
        return _Submitted(next_chunks, handle)

    def _postprocess(self, chunks: list[ScheduledChunk], output: StepOutput) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        now = time.monotonic_ns()
        token_ids = output.token_ids.tolist()        # [num_seqs] ints, one conversion per step
        logprobs = output.logprobs
        cache_full_blocks = self.block_manager.cache_full_blocks
        for i, (seq, num_tokens, start) in enumerate(chunks):
            if seq.is_finished:
                continue                                 # finished (or aborted) while this step ran ahead
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
    block_tables = _block_tables(widths, flat_blocks)                            # [num_seqs, max_blocks]
    slot_mapping = _slot_mapping(block_tables, seq_index, positions, block_size)
    return StepBatch(input_ids=input_ids, positions=positions, query_start_loc=query_start_loc,
                     context_lens=starts_array + lens_array, block_tables=block_tables,
                     slot_mapping=slot_mapping, sample=tuple(sample))


def build_next_decode_batch(seqs: list[Sequence], block_size: int) -> StepBatch:
    """The decode step after the one in flight, built before its tokens are read: sequence i
    feeds the token being sampled for it now (at position num_tokens; the backend takes the id
    from the device, so input_ids here are placeholders) and samples the one after it (generation
    step num_output_tokens + 1). Its block table must already cover position num_tokens. The
    sample requests' token views lack the token in flight: the overlap rule admits no penalties,
    the only readers of those views, so they are left empty (two numpy views per sequence per step
    saved)."""
    positions = np.array([seq.num_tokens for seq in seqs], dtype=np.int32)                # [num_seqs]
    widths = [len(seq.block_table) for seq in seqs]
    block_tables = _block_tables(widths, [b for seq in seqs for b in seq.block_table])
    slot_mapping = _slot_mapping(block_tables, np.arange(len(seqs)), positions, block_size)
    sample = tuple(SampleRequest(seq.spec.sampling, seq.num_output_tokens + 1, _NO_TOKENS, _NO_TOKENS)
                   for seq in seqs)
    return StepBatch(input_ids=np.zeros(len(seqs), np.int32), positions=positions,
                     query_start_loc=np.arange(len(seqs) + 1, dtype=np.int32), context_lens=positions + 1,
                     block_tables=block_tables, slot_mapping=slot_mapping, sample=sample)


def _slot_mapping(block_tables: np.ndarray, seq_index: np.ndarray, positions: np.ndarray,
                  block_size: int) -> np.ndarray:
    """KV slot of each token: block_table[pos // block_size] * block_size + pos % block_size of its
    sequence (seq_index: the token's row of block_tables) # [num_tokens] int32."""
    return (block_tables[seq_index, positions // block_size] * block_size + positions % block_size).astype(np.int32)


def _block_tables(widths: list[int], flat_blocks: list[int]) -> np.ndarray:
    """[num_seqs, max width] int32, -1 padded, from every table laid one after the other.
    Boolean-mask assignment fills row-major, i.e. table after table."""
    block_tables = np.full((len(widths), max(widths)), -1, dtype=np.int32)
    block_tables[np.arange(block_tables.shape[1]) < np.array(widths)[:, None]] = np.array(flat_blocks, np.int32)
    return block_tables
