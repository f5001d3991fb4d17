"""Table-driven request validation. Every failure names the field (as in the proto) and the bound.

Two phases: `validate_request` checks fields before tokenization; `validate_lengths` checks the
prompt length and max_tokens against the context once the prompt is tokenized.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from server.requests import ClientRequest, InputKind

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_BYTES = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_TOP_LOGPROBS = 20
MAX_PROMPT_BYTES = 1 << 20
MAX_CHAT_MESSAGES = 1024
REQUEST_ID_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")   # printable ASCII, no spaces


class RequestInvalid(ValueError):
    """Becomes INVALID_ARGUMENT; the message starts with the field name."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class ModelLimits:
    vocab_size: int
    context_length: int

    def __post_init__(self) -> None:
        if self.vocab_size < 1 or self.context_length < 2:
            raise ValueError(f"bad model limits: vocab {self.vocab_size}, context {self.context_length}")


@dataclass(frozen=True)
class FloatRange:
    field: str
    attribute: str
    low: float
    high: float
    low_open: bool = False   # (low, high] instead of [low, high]

    def check(self, request: ClientRequest) -> None:
        value = getattr(request, self.attribute)
        if value is None:
            return
        above_low = value > self.low if self.low_open else value >= self.low
        if not (math.isfinite(value) and above_low and value <= self.high):
            bracket = "(" if self.low_open else "["
            raise RequestInvalid(self.field, f"must be in {bracket}{self.low:g}, {self.high:g}], got {value!r}")


FLOAT_RANGES = (
    FloatRange("sampling.temperature", "temperature", 0.0, 2.0),
    FloatRange("sampling.top_p", "top_p", 0.0, 1.0, low_open=True),
    FloatRange("sampling.min_p", "min_p", 0.0, 1.0),
    FloatRange("sampling.repetition_penalty", "repetition_penalty", 0.0, 10.0, low_open=True),
    FloatRange("sampling.presence_penalty", "presence_penalty", -2.0, 2.0),
    FloatRange("sampling.frequency_penalty", "frequency_penalty", -2.0, 2.0),
)


def _check_token_ids(field: str, ids: tuple[int, ...], vocab_size: int) -> None:
    for index, token_id in enumerate(ids):
        if not (0 <= token_id < vocab_size):
            raise RequestInvalid(f"{field}[{index}]", f"token id {token_id} is outside the vocabulary "
                                                      f"[0, {vocab_size})")


def _check_input(request: ClientRequest, limits: ModelLimits) -> None:
    kind = request.input_kind
    if kind is InputKind.NONE:
        raise RequestInvalid("input", "one of prompt, chat or token_ids is required")
    if kind is InputKind.PROMPT:
        if not request.prompt:
            raise RequestInvalid("prompt", "must not be empty")
        if len(request.prompt.encode("utf-8", "surrogatepass")) > MAX_PROMPT_BYTES:
            raise RequestInvalid("prompt", f"must be at most {MAX_PROMPT_BYTES} bytes")
    elif kind is InputKind.CHAT:
        _check_chat(request.messages)
    else:
        if not request.token_ids:
            raise RequestInvalid("token_ids.ids", "must not be empty")
        if len(request.token_ids) >= limits.context_length:
            raise RequestInvalid("token_ids.ids", f"{len(request.token_ids)} tokens leave no room in the "
                                                  f"context of {limits.context_length}")
        _check_token_ids("token_ids.ids", request.token_ids, limits.vocab_size)


def _check_chat(messages: tuple[tuple[str, str], ...]) -> None:
    if not messages:
        raise RequestInvalid("chat.messages", "must hold at least one message")
    if len(messages) > MAX_CHAT_MESSAGES:
        raise RequestInvalid("chat.messages", f"at most {MAX_CHAT_MESSAGES} messages, got {len(messages)}")
    total_bytes = 0
    for index, (role, content) in enumerate(messages):
        if role not in CHAT_ROLES:
            raise RequestInvalid(f"chat.messages[{index}].role",
                                 f"unknown role {role[:32]!r}; expected one of {', '.join(CHAT_ROLES)}")
        total_bytes += len(content.encode("utf-8", "surrogatepass"))
    if total_bytes > MAX_PROMPT_BYTES:
        raise RequestInvalid("chat.messages", f"contents must be at most {MAX_PROMPT_BYTES} bytes in all")


def _check_sampling(request: ClientRequest, limits: ModelLimits) -> None:
    for rule in FLOAT_RANGES:
        rule.check(request)
    if request.top_k is not None and not (0 <= request.top_k <= limits.vocab_size):
        raise RequestInvalid("sampling.top_k", f"must be in [0, {limits.vocab_size}], got {request.top_k}")
    if request.seed is not None and not (0 <= request.seed < 2**64):
        raise RequestInvalid("sampling.seed", f"must be in [0, 2^64), got {request.seed}")
    if len(request.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise RequestInvalid("sampling.logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, "
                                                    f"got {len(request.logit_bias)}")
    for token_id, bias in request.logit_bias:
        if not (0 <= token_id < limits.vocab_size):
            raise RequestInvalid(f"sampling.logit_bias[{token_id}]",
                                 f"token id is outside the vocabulary [0, {limits.vocab_size})")
        if not (math.isfinite(bias) and -100.0 <= bias <= 100.0):
            raise RequestInvalid(f"sampling.logit_bias[{token_id}]", f"must be in [-100, 100], got {bias!r}")


def _check_stopping(request: ClientRequest, limits: ModelLimits) -> None:
    if request.max_tokens is not None and request.max_tokens < 1:
        raise RequestInvalid("stopping.max_tokens", f"must be >= 1, got {request.max_tokens}")
    if len(request.stop) > MAX_STOP_STRINGS:
        raise RequestInvalid("stopping.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(request.stop)}")
    for index, stop in enumerate(request.stop):
        size = len(stop.encode("utf-8", "surrogatepass"))
        if not (1 <= size <= MAX_STOP_STRING_BYTES):
            raise RequestInvalid(f"stopping.stop[{index}]",
                                 f"must be 1 to {MAX_STOP_STRING_BYTES} UTF-8 bytes, got {size}")
    if len(request.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestInvalid("stopping.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids, "
                                                        f"got {len(request.stop_token_ids)}")
    _check_token_ids("stopping.stop_token_ids", request.stop_token_ids, limits.vocab_size)


def _check_output_options(request: ClientRequest, limits: ModelLimits) -> None:
    if not (0 <= request.top_logprobs <= MAX_TOP_LOGPROBS):
        raise RequestInvalid("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {request.top_logprobs}")
    if request.request_id and not REQUEST_ID_PATTERN.match(request.request_id):
        raise RequestInvalid("request_id", "must be 1 to 128 printable ASCII characters without spaces")


# Checks run in this order; the first failure is reported.
REQUEST_CHECKS: tuple[Callable[[ClientRequest, ModelLimits], None], ...] = (
    _check_input, _check_sampling, _check_stopping, _check_output_options,
)


def validate_request(request: ClientRequest, limits: ModelLimits) -> None:
    """Raise RequestInvalid for the first field out of bounds (before tokenization)."""
    for check in REQUEST_CHECKS:
        check(request, limits)


def validate_lengths(request: ClientRequest, prompt_tokens: int, limits: ModelLimits) -> None:
    """After tokenization: the prompt plus at least one (or max_tokens) new tokens must fit the context."""
    context = limits.context_length
    field = {InputKind.CHAT: "chat.messages", InputKind.TOKEN_IDS: "token_ids.ids"}.get(
        request.input_kind, "prompt")
    if prompt_tokens < 1:
        raise RequestInvalid(field, "tokenizes to no tokens")
    if prompt_tokens >= context:
        raise RequestInvalid(field, f"{prompt_tokens} tokens leave no room in the context of {context} "
                                    f"(at most {context - 1} prompt tokens)")
    room = context - prompt_tokens
    if request.max_tokens is not None and request.max_tokens > room:
        raise RequestInvalid("stopping.max_tokens",
                             f"{request.max_tokens} exceeds the room left in the context: {room} "
                             f"(context {context} - prompt {prompt_tokens} tokens)")
