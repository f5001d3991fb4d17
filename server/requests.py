"""Front-end domain types: a client's generation request as plain Python values (no protobuf),
and the events the front-end produces for it. `server/convert.py` maps these to and from protobuf.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass

from gpu_worker.sampling.params import SamplingParams, StoppingParams

DEFAULT_MAX_TOKENS = 256


class InputKind(enum.Enum):
    NONE = "none"
    PROMPT = "prompt"
    CHAT = "chat"
    TOKEN_IDS = "token_ids"


@dataclass(frozen=True)
class ClientRequest:
    """A GenerateRequest as received: unvalidated; `None` means the client left the field absent."""

    input_kind: InputKind = InputKind.NONE
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()          # (role, content)
    add_generation_prompt: bool = True
    token_ids: tuple[int, ...] = ()
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    request_id: str = ""

    def sampling_params(self, seed: int) -> SamplingParams:
        """Call only after validation (SamplingParams raises ValueError on bad values)."""
        defaults = SamplingParams()

        def pick(value: float | None, default: float) -> float | int:
            return default if value is None else value

        return SamplingParams(
            temperature=float(pick(self.temperature, defaults.temperature)),
            top_k=int(pick(self.top_k, defaults.top_k)),
            top_p=float(pick(self.top_p, defaults.top_p)),
            min_p=float(pick(self.min_p, defaults.min_p)),
            repetition_penalty=float(pick(self.repetition_penalty, defaults.repetition_penalty)),
            presence_penalty=float(pick(self.presence_penalty, defaults.presence_penalty)),
            frequency_penalty=float(pick(self.frequency_penalty, defaults.frequency_penalty)),
            seed=seed,
            logit_bias=tuple(sorted(self.logit_bias)),
            # top_logprobs > 0 implies logprobs: the alternatives come with the chosen token's logprob.
            logprobs=self.logprobs or self.top_logprobs > 0,
            top_logprobs=self.top_logprobs,
        )

    def stopping_params(self, prompt_len: int, context_length: int,
                        eos_token_ids: tuple[int, ...]) -> StoppingParams:
        room = context_length - prompt_len
        max_tokens = min(DEFAULT_MAX_TOKENS, room) if self.max_tokens is None else self.max_tokens
        return StoppingParams(max_tokens=max_tokens, stop_token_ids=tuple(self.stop_token_ids),
                              ignore_eos=self.ignore_eos, eos_token_ids=eos_token_ids)


class FinishReason(enum.Enum):
    STOP = "stop"            # stop string or stop token id
    LENGTH = "length"        # max_tokens or the context
    EOS = "eos"
    CANCELLED = "cancelled"  # Abort RPC


@dataclass(frozen=True)
class StartedEvent:
    request_id: str
    model: str
    prompt_tokens: int
    seed: int


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float, str], ...] = ()   # (token_id, logprob, text), most likely first


@dataclass(frozen=True)
class DeltaEvent:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class FinishedEvent:
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    queue_ns: int = 0
    time_to_first_token_ns: int = 0
    decode_ns: int = 0
    matched_stop: str = ""


GenerationEvent = StartedEvent | DeltaEvent | FinishedEvent
