"""One generation request, end to end on the front-end side: worker token events in, front-end
events (started, text deltas, finished) out. Stream and unary both consume this same generator, so
their text is identical for the same seed by construction.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from gpu_worker.sampling.params import SamplingParams, StoppingParams
from server.metrics import Metrics
from server.requests import (
    DeltaEvent,
    FinishedEvent,
    FinishReason,
    GenerationEvent,
    StartedEvent,
    TokenLogprob,
)
from server.text import OutputText, TextTools
from server.worker_client import FinishedEvent as WorkerFinished
from server.worker_client import TokenEvent as WorkerToken

_WORKER_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "eos": FinishReason.EOS,
                   "cancelled": FinishReason.CANCELLED}


@dataclass(frozen=True)
class GenerationJob:
    request_id: str          # the client's (or assigned) id: Started, logs, Abort
    worker_request_id: str   # unique per call, so that a client reusing an id never collides in the worker
    model: str
    prompt_ids: list[int]
    sampling: SamplingParams
    stopping: StoppingParams
    stops: tuple[str, ...]
    arrival_ns: int


def worker_reason(reason: str) -> FinishReason:
    if reason not in _WORKER_REASONS:
        raise ValueError(f"unknown finish reason from the worker: {reason!r}")
    return _WORKER_REASONS[reason]


def _logprob_entry(tools: TextTools, token_id: int, logprobs: Any) -> TokenLogprob:
    top = tuple((int(alt_id), float(alt_logprob), tools.piece(int(alt_id)))
                for alt_id, alt_logprob in logprobs.top)
    return TokenLogprob(token_id=token_id, logprob=float(logprobs.logprob), top=top)


class Generation:
    """Drives one request through `worker.generate` and records its metrics."""

    def __init__(self, worker: Any, tools: TextTools, metrics: Metrics, job: GenerationJob) -> None:
        self.worker, self.tools, self.metrics, self.job = worker, tools, metrics, job
        hidden = set(job.stopping.stop_token_ids)
        if not job.stopping.ignore_eos:
            hidden.update(job.stopping.eos_token_ids)
        self.text = OutputText(tools, job.stops, frozenset(hidden))
        self.completion_tokens = 0
        self.first_token_ns = 0
        self.last_token_ns = 0
        self.finished = False

    def _observe_tokens(self, count: int) -> None:
        """Time to first token, and the inter-token gaps of `count` tokens that arrived together: the
        gap since the previous arrival is spread evenly over them (sum and count stay exact)."""
        now = time.monotonic_ns()
        gaps, span_ns = count, now - self.last_token_ns
        if self.completion_tokens == 0:
            self.first_token_ns = now
            self.metrics.observe_ttft((now - self.job.arrival_ns) / 1e9)
            gaps, span_ns = count - 1, 0            # the rest of a first batch came with the first
        if gaps > 0:
            self.metrics.observe_itl(span_ns / gaps / 1e9, gaps)
        self.last_token_ns = now
        self.completion_tokens += count

    def _finished(self, reason: FinishReason, matched_stop: str = "", queue_ns: int = 0) -> FinishedEvent:
        self.finished = True
        front_ttft = self.first_token_ns - self.job.arrival_ns if self.completion_tokens else 0
        return FinishedEvent(
            reason=reason, prompt_tokens=len(self.job.prompt_ids), completion_tokens=self.completion_tokens,
            queue_ns=queue_ns,
            time_to_first_token_ns=max(0, front_ttft),
            decode_ns=max(0, self.last_token_ns - self.first_token_ns),
            matched_stop=matched_stop)

    async def events(self) -> AsyncIterator[GenerationEvent]:
        job = self.job
        yield StartedEvent(job.request_id, job.model, len(job.prompt_ids), job.sampling.seed)
        stream = self.worker.generate_batches(job.worker_request_id, job.prompt_ids, job.sampling, job.stopping)
        matched: str | None = None
        async with contextlib.aclosing(stream):
            async for batch in stream:
                finish = batch[-1] if isinstance(batch[-1], WorkerFinished) else None
                tokens = batch[:-1] if finish is not None else batch
                if tokens:
                    delta, matched = self._on_tokens(tokens)
                    yield delta
                    if matched is not None:
                        break
                if finish is not None:
                    for tail in self._finish(finish):
                        yield tail
                    return
            else:
                raise RuntimeError("the worker's event stream ended without a finished event")
        # A stop string matched: leaving the `async with` closed the worker stream, which aborts the
        # request in the worker (WorkerClient.generate_batches' contract) and frees its KV blocks.
        yield self._finished(FinishReason.STOP, matched_stop=matched or "")

    def _on_tokens(self, events: list[WorkerToken]) -> tuple[DeltaEvent, str | None]:
        """All tokens that arrived together become one delta (one gRPC message). A stop string that
        matches ends the delta at the token that completed it; later tokens are dropped, as the
        request is aborted."""
        texts: list[str] = []
        token_ids: list[int] = []
        entries: list[TokenLogprob] = []
        matched: str | None = None
        push = self.text.push
        for token_id, logprobs in events:
            token_id = int(token_id)
            text, matched = push(token_id)
            texts.append(text)
            token_ids.append(token_id)
            if logprobs is not None:
                entries.append(_logprob_entry(self.tools, token_id, logprobs))
            if matched is not None:
                break
        self._observe_tokens(len(token_ids))
        return DeltaEvent("".join(texts), tuple(token_ids), tuple(entries)), matched

    def _finish(self, event: WorkerFinished) -> list[GenerationEvent]:
        text, matched = self.text.finish()
        tail: list[GenerationEvent] = [DeltaEvent(text, ())] if text else []
        reason = FinishReason.STOP if matched is not None else worker_reason(event.reason)
        tail.append(self._finished(reason, matched_stop=matched or "", queue_ns=event.queue_ns))
        return tail
