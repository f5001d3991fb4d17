"""Typed results of the qwen-serve API (plain dataclasses; no protobuf in user code)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Finish reasons as the server reports them (proto FinishReason without the prefix, lowercase).
FINISH_REASONS = ("unspecified", "stop", "length", "eos", "cancelled")


@dataclass(frozen=True)
class GenerateOptions:
    """Sampling and stopping. `None` = the server's default (temperature 1.0, max_tokens 256, ...)."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str = ""


@dataclass(frozen=True)
class Started:
    request_id: str
    model: str
    prompt_tokens: int
    seed: int


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    logprob: float
    text: str


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TokenDelta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    reason: str                   # one of FINISH_REASONS
    prompt_tokens: int
    completion_tokens: int
    queue_ns: int
    time_to_first_token_ns: int
    decode_ns: int
    matched_stop: str = ""


Event = Started | TokenDelta | Finished


@dataclass(frozen=True)
class Completion:
    started: Started
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...]
    finished: Finished


@dataclass(frozen=True)
class Tokens:
    ids: tuple[int, ...]
    pieces: tuple[str, ...]


def as_json(value: Any) -> dict[str, Any]:
    """An event or result as a JSON-ready dict with its kind: {"event": "token", ...}."""
    from dataclasses import asdict

    kinds = {Started: "started", TokenDelta: "token", Finished: "finished", Completion: "completion",
             Tokens: "tokens"}
    return {"event": kinds.get(type(value), type(value).__name__.lower()), **asdict(value)}
