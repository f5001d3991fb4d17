"""Table-driven validation: each bad request names its field and bound; good ones pass."""
from __future__ import annotations

import math

import pytest

from qwen_serve.v1 import generate_pb2 as pb
from server.convert import request_from_proto
from server.validation import ModelLimits, RequestInvalid, validate_lengths, validate_request

LIMITS = ModelLimits(vocab_size=1000, context_length=64)


def _request(**fields: object) -> pb.GenerateRequest:
    sampling = fields.pop("sampling", {})
    stopping = fields.pop("stopping", {})
    fields.setdefault("prompt", "hello")
    return pb.GenerateRequest(sampling=pb.SamplingParams(**sampling), stopping=pb.StoppingParams(**stopping),
                              **fields)


def _chat(*pairs: tuple[str, str]) -> pb.ChatMessages:
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs])


# (case name, request, field named in the message, words of the bound)
INVALID = [
    ("no input", pb.GenerateRequest(), "input", "required"),
    ("empty prompt", _request(prompt=""), "prompt", "must not be empty"),
    ("prompt too large", _request(prompt="x" * (1 << 20 | 1)), "prompt", "1048576 bytes"),
    ("empty chat", pb.GenerateRequest(chat=pb.ChatMessages()), "chat.messages", "at least one"),
    ("unknown role", pb.GenerateRequest(chat=_chat(("user", "hi"), ("robot", "x"))), "chat.messages[1].role",
     "system, user, assistant, tool"),
    ("empty token ids", pb.GenerateRequest(token_ids=pb.TokenIds()), "token_ids.ids", "must not be empty"),
    ("token id beyond vocab", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 1000])), "token_ids.ids[1]",
     "[0, 1000)"),
    ("token ids fill context", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 64)), "token_ids.ids",
     "context of 64"),
    ("temperature negative", _request(sampling={"temperature": -0.1}), "sampling.temperature", "[0, 2]"),
    ("temperature above 2", _request(sampling={"temperature": 2.5}), "sampling.temperature", "[0, 2]"),
    ("temperature nan", _request(sampling={"temperature": math.nan}), "sampling.temperature", "nan"),
    ("temperature inf", _request(sampling={"temperature": math.inf}), "sampling.temperature", "[0, 2]"),
    ("top_p zero", _request(sampling={"top_p": 0.0}), "sampling.top_p", "(0, 1]"),
    ("top_p above 1", _request(sampling={"top_p": 1.5}), "sampling.top_p", "(0, 1]"),
    ("top_k beyond vocab", _request(sampling={"top_k": 1001}), "sampling.top_k", "[0, 1000]"),
    ("min_p above 1", _request(sampling={"min_p": 1.01}), "sampling.min_p", "[0, 1]"),
    ("repetition zero", _request(sampling={"repetition_penalty": 0.0}), "sampling.repetition_penalty",
     "(0, 10]"),
    ("presence too big", _request(sampling={"presence_penalty": 3.0}), "sampling.presence_penalty", "[-2, 2]"),
    ("frequency too small", _request(sampling={"frequency_penalty": -2.5}), "sampling.frequency_penalty",
     "[-2, 2]"),
    ("logit bias id", _request(sampling={"logit_bias": {1000: 1.0}}), "sampling.logit_bias[1000]",
     "[0, 1000)"),
    ("logit bias value", _request(sampling={"logit_bias": {5: 101.0}}), "sampling.logit_bias[5]",
     "[-100, 100]"),
    ("max_tokens zero", _request(stopping={"max_tokens": 0}), "stopping.max_tokens", ">= 1"),
    ("nine stop strings", _request(stopping={"stop": [f"s{i}" for i in range(9)]}), "stopping.stop",
     "at most 8"),
    ("long stop string", _request(stopping={"stop": ["é" * 129]}), "stopping.stop[0]", "1 to 256 UTF-8 bytes"),
    ("empty stop string", _request(stopping={"stop": ["ok", ""]}), "stopping.stop[1]", "1 to 256"),
    ("stop token beyond vocab", _request(stopping={"stop_token_ids": [5, 4000]}),
     "stopping.stop_token_ids[1]", "[0, 1000)"),
    ("top_logprobs 21", _request(top_logprobs=21), "top_logprobs", "[0, 20]"),
    ("request id with space", _request(request_id="a b"), "request_id", "printable ASCII"),
    ("request id too long", _request(request_id="x" * 129), "request_id", "1 to 128"),
]


@pytest.mark.parametrize("request_message, field, bound", [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
def test_invalid_request_names_field_and_bound(request_message: pb.GenerateRequest, field: str,
                                               bound: str) -> None:
    with pytest.raises(RequestInvalid) as caught:
        validate_request(request_from_proto(request_message), LIMITS)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"{field}: ")
    assert bound in str(caught.value)


VALID = [
    _request(),
    _request(sampling={"temperature": 0.0, "top_p": 1.0, "top_k": 1000, "min_p": 0.0, "seed": 2**64 - 1,
                       "repetition_penalty": 10.0, "presence_penalty": -2.0, "frequency_penalty": 2.0,
                       "logit_bias": {0: -100.0, 999: 100.0}}),
    _request(stopping={"max_tokens": 1, "stop": ["x" * 256] * 8, "stop_token_ids": [0, 999]}),
    _request(top_logprobs=20, logprobs=True, request_id="req-1:a/b"),
    pb.GenerateRequest(chat=_chat(("system", "s"), ("user", "u"), ("assistant", "a"), ("tool", "t"))),
    pb.GenerateRequest(token_ids=pb.TokenIds(ids=[0] * 63)),
]


@pytest.mark.parametrize("request_message", VALID)
def test_valid_requests_pass(request_message: pb.GenerateRequest) -> None:
    request = request_from_proto(request_message)
    validate_request(request, LIMITS)
    request.sampling_params(seed=1)   # the worker-side dataclass accepts what validation passed


def test_prompt_length_against_context() -> None:
    request = request_from_proto(_request())
    validate_lengths(request, 63, LIMITS)
    with pytest.raises(RequestInvalid, match=r"prompt: 64 tokens leave no room in the context of 64"):
        validate_lengths(request, 64, LIMITS)


def test_max_tokens_beyond_room_left() -> None:
    request = request_from_proto(_request(stopping={"max_tokens": 11}))
    validate_lengths(request, 53, LIMITS)   # 64 - 53 = 11: fits exactly
    with pytest.raises(RequestInvalid, match=r"stopping.max_tokens: 11 exceeds the room left in the context: 10"):
        validate_lengths(request, 54, LIMITS)


def test_absent_fields_take_defaults_not_zero() -> None:
    request = request_from_proto(_request())
    params = request.sampling_params(seed=7)
    assert params.temperature == 1.0 and params.top_p == 1.0 and params.seed == 7
    assert request.stopping_params(prompt_len=60, context_length=64, eos_token_ids=(3,)).max_tokens == 4
    assert request.stopping_params(prompt_len=2, context_length=1024, eos_token_ids=(3,)).max_tokens == 256
    greedy = request_from_proto(_request(sampling={"temperature": 0.0})).sampling_params(seed=0)
    assert greedy.is_greedy
