"""Stop strings matched on detokenized text across token boundaries.

Text that could still become the start of a stop string is held back, so a matched stop string is
never emitted, not even its first characters. Everything before the match is emitted.
"""
from __future__ import annotations

from typing import NamedTuple


class StopMatch(NamedTuple):
    """One per generated token: a NamedTuple, cheaper to build than a frozen dataclass."""

    emit: str                  # text safe to send now
    matched: str | None        # the stop string that matched (generation ends), else None


class StopStringMatcher:
    """Feed text pieces with `push`; `flush` returns held-back text once generation ends otherwise."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        if any(not stop for stop in stops):
            raise ValueError("stop strings must not be empty")
        self._stops = stops
        self._pending = ""     # held-back text: a suffix that is a prefix of some stop string
        self._done = False

    def push(self, text: str) -> StopMatch:
        if self._done:
            raise ValueError("push after a stop string matched")
        if not self._stops:
            return StopMatch(text, None)
        buffer = self._pending + text
        match_at, matched = self._earliest_match(buffer)
        if matched is not None:
            self._pending, self._done = "", True
            return StopMatch(buffer[:match_at], matched)
        keep = self._longest_prefix_suffix(buffer)
        split = len(buffer) - keep
        self._pending = buffer[split:]
        return StopMatch(buffer[:split], None)

    def flush(self) -> str:
        held, self._pending = self._pending, ""
        return held

    def _earliest_match(self, buffer: str) -> tuple[int, str | None]:
        best_at, best = len(buffer) + 1, None
        for stop in self._stops:
            at = buffer.find(stop)
            # Earliest start wins; at equal starts the longer stop string (it contains the shorter).
            if at >= 0 and (at < best_at or (at == best_at and best is not None and len(stop) > len(best))):
                best_at, best = at, stop
        return best_at, best

    def _longest_prefix_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:length]):
                    longest = length
                    break
        return longest
