"""The backend interface: the same for the numpy reference (`cpu`) and `cuda`.

The engine owns scheduling and the KV block tables; a backend owns weights and KV memory and runs
one step over an explicit batch. Nothing else crosses this boundary.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gpu_worker.sampling.params import SamplingParams


class SampleRequest(NamedTuple):
    """What the sampler needs for one sequence at generation step `step` (0 = first new token).
    A NamedTuple, not a frozen dataclass: the engine builds one per sequence per step (256 per
    decode step), at half the cost; fields and construction are the same."""

    params: SamplingParams
    step: int
    # Prompt + generated ids so far (repetition penalty looks at both) # [num_seen] int32
    seen_token_ids: np.ndarray
    # Generated ids so far (presence/frequency penalties count these) # [num_generated] int32
    output_token_ids: np.ndarray


@dataclass(frozen=True)
class StepBatch:
    """One engine step over `num_seqs` sequences with `num_tokens` new tokens in all.

    Sequence i contributes input_ids[query_start_loc[i]:query_start_loc[i+1]] (a prefill chunk or
    one decode token). Its KV for those tokens is written to `slot_mapping` slots
    (block_id * block_size + offset) before attention reads positions [0, context_lens[i]).
    """

    input_ids: np.ndarray        # [num_tokens] int32
    positions: np.ndarray        # [num_tokens] int32, absolute positions
    query_start_loc: np.ndarray  # [num_seqs + 1] int32, cumulative
    context_lens: np.ndarray     # [num_seqs] int32, KV length after this step
    block_tables: np.ndarray     # [num_seqs, max_blocks_per_seq] int32, -1 padded
    slot_mapping: np.ndarray     # [num_tokens] int32
    # Per sequence: a SampleRequest when this step ends its prompt or is a decode step; None for a
    # prefill chunk that is not the prompt's last (nothing sampled).
    sample: tuple[SampleRequest | None, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    def check(self, vocab_size: int, num_blocks: int, block_size: int) -> None:
        """ValueError naming the field for a batch any backend would misread (both backends call it,
        then add their own limits)."""
        n, num_seqs = self.num_tokens, self.num_seqs
        if n == 0 or num_seqs == 0:
            raise ValueError("a step needs at least one sequence and one token")
        for name in ("positions", "slot_mapping"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, input_ids has {n}")
        starts = np.asarray(self.query_start_loc)
        if len(starts) != num_seqs + 1 or starts[0] != 0 or starts[-1] != n or np.any(np.diff(starts) <= 0):
            raise ValueError(f"query_start_loc must rise strictly from 0 to {n} over {num_seqs + 1} entries")
        if len(self.sample) != num_seqs or self.block_tables.shape[0] != num_seqs:
            raise ValueError("sample and block_tables need one entry per sequence")
        if self.input_ids.min() < 0 or self.input_ids.max() >= vocab_size:
            raise ValueError(f"input_ids must be in [0, {vocab_size})")
        if self.slot_mapping.min() < 0 or self.slot_mapping.max() >= num_blocks * block_size:
            raise ValueError(f"slot_mapping must be in [0, {num_blocks * block_size})")
        # Per sequence, vectorized (256 sequences per decode step); the first bad one is named.
        contexts = np.asarray(self.context_lens, np.int64)
        bad_context = np.asarray(self.positions)[starts[1:] - 1].astype(np.int64) + 1 != contexts
        used = -(-contexts // block_size)
        width = self.block_tables.shape[1]
        covered = np.arange(width)[None, :] < used[:, None]
        bad_entry = covered & ((self.block_tables < 0) | (self.block_tables >= num_blocks))
        bad_table = (used > width) | bad_entry.any(axis=1)
        bad = np.flatnonzero(bad_context | bad_table)
        if len(bad):
            seq = int(bad[0])
            if bad_context[seq]:
                raise ValueError(f"sequence {seq}: context_lens {int(contexts[seq])} != last position + 1")
            raise ValueError(f"sequence {seq}: block table does not cover {int(contexts[seq])} tokens")

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token_id, logprob), most likely first


@dataclass(frozen=True)
class StepOutput:
    token_ids: np.ndarray                        # [num_seqs] int32, -1 where nothing was sampled
    logprobs: tuple[TokenLogprobs | None, ...]   # per sequence, when its params ask for logprobs

    @classmethod
    def of_sampled(cls, num_seqs: int, sampled: Sequence[int], tokens: Sequence[int],
                   logprobs: Sequence[TokenLogprobs | None]) -> StepOutput:
        """The output of a step whose sequences sampled[j] drew tokens[j] (with logprobs[j]); the
        others sampled nothing."""
        token_ids = np.full(num_seqs, -1, np.int32)
        per_seq: list[TokenLogprobs | None] = [None] * num_seqs
        for j, seq in enumerate(sampled):
            token_ids[seq], per_seq[seq] = tokens[j], logprobs[j]
        return cls(token_ids=token_ids, logprobs=tuple(per_seq))


class Backend(ABC):
    """A model on a device: weights, KV cache memory and one step of the forward + sampler."""

    name: str            # "cpu" or "cuda"
    device_name: str     # e.g. "numpy (2 CPU cores)" or "NVIDIA H100 80GB HBM3"
    weight_bytes: int    # bytes the weights occupy on the device (exact)
    # Whether submit() takes previous_rows, so that the engine can start decode step N + 1 before it
    # has read step N's tokens (engine.py: overlapped decode steps).
    supports_overlap: bool = False

    @abstractmethod
    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes one KV block of `block_size` tokens takes (all layers, K and V)."""

    @abstractmethod
    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """Preallocate the paged KV cache; block ids are [0, num_blocks)."""

    @abstractmethod
    def step(self, batch: StepBatch) -> StepOutput:
        """Run the forward over `batch`, write its KV, sample where asked."""

    def submit(self, batch: StepBatch, previous_rows: np.ndarray | None = None) -> object:
        """Start a step; `collect(handle)` returns its output. Steps run and are collected in submit
        order; at most two are outstanding. previous_rows (backends with supports_overlap): `batch`
        is a decode step after a decode step that sampled every row, and sequence i's input id is
        the token sampled in row previous_rows[i] of that previous submitted step, taken on the
        device (the batch's own input_ids are ignored). Default: step() at once."""
        if previous_rows is not None:
            raise NotImplementedError(f"the {self.name} backend cannot take inputs from the previous step")
        return self.step(batch)

    def collect(self, handle: object) -> StepOutput:
        """The output of a submitted step, waiting for it. Default: submit's handle is the output."""
        assert isinstance(handle, StepOutput)
        return handle

    def close(self) -> None:
        """Release device memory."""
