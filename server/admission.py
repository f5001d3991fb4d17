"""Admission control: a bounded number of generation requests in flight (running + queued).

Beyond the bound a request is refused at once (RESOURCE_EXHAUSTED with a retry hint) instead of
waiting in an unbounded queue in front-end memory.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Refusal:
    message: str
    retry_after_ms: int


class AdmissionGate:
    """Counts admitted requests; `try_admit` is O(1) and never blocks (single asyncio loop)."""

    def __init__(self, max_running: int, max_queue: int) -> None:
        if max_running < 1 or max_queue < 0:
            raise ValueError(f"bad admission bounds: running {max_running}, queue {max_queue}")
        self.max_running = max_running
        self.max_queue = max_queue
        self.in_flight = 0

    @property
    def capacity(self) -> int:
        return self.max_running + self.max_queue

    @property
    def queued(self) -> int:
        return max(0, self.in_flight - self.max_running)

    def try_admit(self) -> Refusal | None:
        if self.in_flight >= self.capacity:
            # Hint: about one request's worth of decode time per queued slot is a fair back-off.
            return Refusal(f"server busy: {self.in_flight} requests in flight (max {self.max_running} running "
                           f"+ {self.max_queue} queued); retry later", retry_after_ms=1000)
        self.in_flight += 1
        return None

    def release(self) -> None:
        if self.in_flight <= 0:
            raise ValueError("release without a matching admit")
        self.in_flight -= 1
