"""Continuous batching: which sequences run in the next step, and how many tokens each feeds.

Every step, under a token budget (`max_tokens_per_step`) and a sequence cap (`max_batch`):
  1. running sequences first: decodes (1 token) before continuing prefill chunks, oldest first;
  2. then waiting sequences are admitted FCFS with a prefill chunk of what budget and KV allow.
When KV runs out for a running sequence, the most recently admitted other running sequence is
preempted by recompute (its blocks are freed; it re-prefills prompt + generated tokens later),
or the sequence itself yields if none is left. A sequence that cannot fit even alone in the
whole cache is finished ("length" once it has output, "error" otherwise) instead of looping.
An admitted (or re-admitted, after preemption) sequence first reuses the cached KV blocks of its
leading full blocks (block_manager.py: prefix caching) and prefills from their end.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from gpu_worker.engine.block_manager import KVBlockManager
from gpu_worker.engine.sequence import Sequence, SequenceStatus


class ScheduledChunk(NamedTuple):
    """A NamedTuple, not a frozen dataclass: one is built per sequence per step, at half the cost."""

    seq: Sequence
    num_tokens: int          # tokens fed this step: token_ids[start : start + num_tokens]
    start: int               # == seq.num_computed_tokens when scheduled

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the last known token, so a new token is sampled."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)   # unschedulable, finished here

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, block_manager: KVBlockManager, max_batch: int, max_tokens_per_step: int) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_tokens_per_step < 1:
            raise ValueError(f"max_tokens_per_step must be >= 1, got {max_tokens_per_step}")
        self.block_manager = block_manager
        self.max_batch = max_batch
        self.max_tokens_per_step = max_tokens_per_step
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []      # admission order, oldest first

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str, message: str = "") -> None:
        """Remove seq from the queues, free its KV, mark it finished (idempotent)."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error_message = message

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self._schedule_running(out, self.max_tokens_per_step)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        for s in self.running:
            uncomputed = s.num_uncomputed_tokens
            if uncomputed == 1:
                decodes.append(s)
            elif uncomputed > 1:
                prefills.append(s)
        pending = deque(decodes + prefills)
        bm = self.block_manager
        max_kv_tokens = bm.num_blocks * bm.block_size     # more than this never fits
        while pending and budget > 0 and len(out.chunks) < self.max_batch:
            seq = pending.popleft()
            # The cheap bound first: this loop runs for every running sequence every step.
            if seq.num_tokens > max_kv_tokens and self._finish_if_never_fits(seq, out):
                continue
            computed = seq.num_computed_tokens
            if seq.num_tokens - computed == 1 and computed < len(seq.block_table) * bm.block_size:
                # A decode whose token fits its last block: what _fit_chunk and _take would do,
                # without their calls (15 of 16 decode steps of every running sequence).
                out.chunks.append(ScheduledChunk(seq, 1, computed))
                budget -= 1
                continue
            chunk = self._fit_chunk(seq, min(seq.num_uncomputed_tokens, budget))
            while chunk == 0 and pending:
                self._preempt(pending.pop(), out)       # newest other sequence gives way
                chunk = self._fit_chunk(seq, min(seq.num_uncomputed_tokens, budget))
            if chunk == 0:
                self._preempt(seq, out)
                continue
            budget -= self._take(seq, chunk, out)
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.max_batch \
                and len(out.chunks) < self.max_batch:
            seq = self.waiting[0]
            if self._finish_if_never_fits(seq, out):
                continue
            cached = self.block_manager.match_prefix(seq)
            chunk = self._fit_admission(seq, cached, budget)
            if chunk == 0:
                break                                   # FCFS: wait for blocks to free up
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self.block_manager.attach_prefix(seq, cached)
            budget -= self._take(seq, chunk, out)

    def _fit_chunk(self, seq: Sequence, wanted: int) -> int:
        """Largest chunk <= wanted whose KV fits in the blocks seq has plus the free ones."""
        bm = self.block_manager
        room = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size - seq.num_computed_tokens
        return wanted if wanted <= room else max(0, room)

    def _fit_admission(self, seq: Sequence, cached: list[int], budget: int) -> int:
        """_fit_chunk for a sequence holding no KV that would reuse the `cached` prefix blocks:
        it computes from their end; those of them now free leave the free list."""
        bm = self.block_manager
        start = len(cached) * bm.block_size
        capacity = (bm.num_free_blocks - bm.num_free_among(cached) + len(cached)) * bm.block_size
        return max(0, min(seq.num_tokens - start, budget, capacity - start))

    def _take(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> int:
        self.block_manager.allocate(seq, num_tokens)
        out.chunks.append(ScheduledChunk(seq, num_tokens, seq.num_computed_tokens))
        return num_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _finish_if_never_fits(self, seq: Sequence, out: SchedulerOutput) -> bool:
        bm = self.block_manager
        needed = bm.blocks_for_tokens(seq.num_tokens)
        if needed <= bm.num_blocks:
            return False
        if seq.num_output_tokens > 0:
            self.finish(seq, "length")
        else:
            self.finish(seq, "error", f"prompt of {seq.num_tokens} tokens needs {needed} KV blocks; "
                                      f"the cache has {bm.num_blocks}")
        out.finished.append(seq)
        return True
