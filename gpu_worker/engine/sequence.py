"""One request's state inside the engine: tokens, KV progress, block table, timings."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import numpy as np

from gpu_worker.engine.prefix_cache import ROOT_KEY, chain_key
from gpu_worker.sampling.params import SamplingParams, StoppingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"      # queued (new, or preempted and waiting to recompute)
    RUNNING = "running"      # owns KV blocks; prefilling in chunks or decoding
    FINISHED = "finished"


# Finish reasons the engine reports ("stop" = a stop token id; "error" carries a message).
FINISH_REASONS = ("eos", "length", "stop", "cancelled", "error")


@dataclass(frozen=True)
class RequestSpec:
    """What a client submits; validated again here because the worker trusts no one."""

    request_key: int                  # front-end's integer handle, unique while in flight
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    stopping: StoppingParams

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if self.stopping.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.stopping.max_tokens}")
        if not (0 <= self.request_key < 2**64):
            raise ValueError(f"request_key must be in [0, 2^64), got {self.request_key}")


class Sequence:
    """Prompt + generated tokens of one request.

    Invariant: `num_computed_tokens` tokens have their KV written; the next step feeds
    token_ids[num_computed_tokens : num_computed_tokens + chunk]. Preemption (recompute) drops
    the KV and resets `num_computed_tokens` to 0; generated tokens stay and are re-prefilled.
    """

    def __init__(self, spec: RequestSpec, arrival_ns: int | None = None,
                 default_eos_ids: frozenset[int] = frozenset()) -> None:
        self.spec = spec
        self.key = spec.request_key
        self.num_prompt_tokens = len(spec.prompt_token_ids)
        # Ids that end the request, as sets built once (checked for every generated token):
        # stop ids always; EOS ids (the request's own, else the model's) unless ignore_eos.
        stopping = spec.stopping
        self.stop_ids = frozenset(stopping.stop_token_ids)
        self.eos_ids = frozenset() if stopping.ignore_eos else (frozenset(stopping.eos_token_ids)
                                                                or default_eos_ids)
        self.max_tokens = stopping.max_tokens
        # The engine's overlap rule: penalties read the tokens so far, the one in flight included, and
        # a logit bias is uploaded per step from pageable memory, which can wait for the device; a
        # sequence with either is never in a decode step submitted ahead (computed once: the
        # engine checks it for every sequence at every step).
        sampling = spec.sampling
        self.needs_host_sampling_inputs = (sampling.repetition_penalty != 1.0 or sampling.presence_penalty != 0.0
                                           or sampling.frequency_penalty != 0.0 or bool(sampling.logit_bias))
        # Prompt + generated ids in a growable buffer, so each step hands the sampler views instead
        # of converting a Python list (that cost grows with length x batch). # [capacity] int32
        self._ids = np.empty(max(16, 2 * self.num_prompt_tokens), dtype=np.int32)
        self._ids[:self.num_prompt_tokens] = spec.prompt_token_ids
        self._readonly_ids = _readonly(self._ids)
        self._num_tokens = self.num_prompt_tokens
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        # Prefix cache: chain keys of full blocks (stable: token ids never change once written),
        # how many leading blocks of block_table are registered in / taken from the cache, and
        # how many prompt tokens the last admission reused instead of computing.
        self._block_keys: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.error_message = ""
        self.num_preemptions = 0
        self.arrival_ns = arrival_ns if arrival_ns is not None else time.monotonic_ns()
        self.first_scheduled_ns: int | None = None
        self.first_token_ns: int | None = None
        self.finished_ns: int | None = None

    @property
    def token_ids(self) -> np.ndarray:
        """Prompt + generated ids, a read-only view # [num_tokens] int32. Entries never change
        once written (appends go past the view; growth copies to a new buffer)."""
        return self._readonly_ids[:self._num_tokens]

    @property
    def output_token_ids(self) -> np.ndarray:
        return self._readonly_ids[self.num_prompt_tokens:self._num_tokens]

    def token_id(self, index: int) -> int:
        """token_ids[index] as an int, without a view (index < num_tokens)."""
        if not 0 <= index < self._num_tokens:
            raise IndexError(f"token {index} of {self._num_tokens}")
        return int(self._ids.item(index))

    def token_slice(self, start: int, stop: int) -> np.ndarray:
        """token_ids[start:stop] without the intermediate view (read-only) # [stop - start] int32."""
        return self._readonly_ids[start:min(stop, self._num_tokens)]

    def append_token(self, token_id: int) -> None:
        if self._num_tokens == len(self._ids):
            grown = np.empty(2 * len(self._ids), dtype=np.int32)
            grown[:self._num_tokens] = self._ids[:self._num_tokens]
            self._ids = grown
            self._readonly_ids = _readonly(grown)
        self._ids[self._num_tokens] = token_id
        self._num_tokens += 1

    def block_key(self, index: int, block_size: int) -> bytes:
        """Chain key of full block `index` (tokens [index * block_size, (index + 1) * block_size))."""
        if (index + 1) * block_size > self._num_tokens:
            raise ValueError(f"block {index} of {block_size} tokens is not full ({self._num_tokens} tokens)")
        while len(self._block_keys) <= index:
            i = len(self._block_keys)
            parent = self._block_keys[-1] if self._block_keys else ROOT_KEY
            self._block_keys.append(chain_key(parent, self._ids[i * block_size:(i + 1) * block_size]))
        return self._block_keys[index]

    @property
    def num_tokens(self) -> int:
        return self._num_tokens

    @property
    def num_output_tokens(self) -> int:
        return self._num_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed before the next sample (1 for a decode step)."""
        return self._num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def timings_ns(self) -> tuple[int, int, int]:
        """(queue_ns, ttft_ns, decode_ns), each measured from the worker's monotonic clock."""
        end = self.finished_ns or time.monotonic_ns()
        queue_ns = (self.first_scheduled_ns or end) - self.arrival_ns
        ttft_ns = (self.first_token_ns - self.arrival_ns) if self.first_token_ns else 0
        decode_ns = (end - self.first_token_ns) if self.first_token_ns else 0
        return queue_ns, ttft_ns, decode_ns


def _readonly(buffer: np.ndarray) -> np.ndarray:
    """A read-only view of `buffer`; its slices are read-only too, so views handed out per step
    need no flag change of their own (that costs more than the slice)."""
    view = buffer.view()
    view.flags.writeable = False
    return view
