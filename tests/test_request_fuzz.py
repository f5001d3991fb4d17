"""Property-based request fuzzing through a live server (real gRPC, real worker, tiny model).

Every answer must be OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED (size limits); afterwards the server
is healthy, serves a normal request, and holds no running request or KV block.
"""
from __future__ import annotations

import collections
import math
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qwen_client import GenerateOptions, QwenClient

from qwen_serve.v1 import generate_pb2 as pb
from server.background import BackgroundServer
from server.config import ServeConfig

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
METHODS = ("Generate", "Complete", "Tokenize", "Detokenize", "GetModelInfo", "Abort")
MAX_STREAM_EVENTS = 4          # a valid stream is read this far, then cancelled (bounded run time)
OUTCOMES: collections.Counter[str] = collections.Counter()

texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
huge_text = st.sampled_from(["x" * 5000, "hi " * 3000, "\u00e9" * 4000])
floats = st.floats(width=32) | st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e30, 2.0, 0.0])
uint32 = st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 151935, 151936, 151645])
roles = st.sampled_from(["system", "user", "assistant", "tool", "", "robot", "USER", "user\x00"])


def mostly(valid: st.SearchStrategy, wild: st.SearchStrategy) -> st.SearchStrategy:
    """Valid 15 times in 16, so that a good share of requests (with ~12 such fields) gets through to
    generation; wild otherwise."""
    return st.sampled_from(range(16)).flatmap(lambda coin: wild if coin == 7 else valid)


VALID_RANGES = {"temperature": (0.0, 2.0), "top_p": (0.125, 1.0), "min_p": (0.0, 1.0),
                "repetition_penalty": (0.125, 10.0), "presence_penalty": (-2.0, 2.0),
                "frequency_penalty": (-2.0, 2.0)}


@st.composite
def sampling_params(draw: st.DrawFn) -> pb.SamplingParams:
    message = pb.SamplingParams()
    for name, (low, high) in VALID_RANGES.items():
        if draw(st.booleans()):
            setattr(message, name, draw(mostly(st.floats(low, high, width=32), floats)))
    if draw(st.booleans()):
        message.top_k = draw(mostly(st.integers(0, 100), uint32))
    if draw(st.booleans()):
        message.seed = draw(st.integers(0, 2**64 - 1))
    bias = st.dictionaries(mostly(st.integers(0, 1000), uint32), mostly(st.floats(-100, 100, width=32), floats),
                           max_size=4)
    for token_id, value in draw(bias).items():
        message.logit_bias[token_id] = value
    return message


@st.composite
def stopping_params(draw: st.DrawFn, complete: bool) -> pb.StoppingParams:
    stops = mostly(st.lists(texts.filter(lambda t: 0 < len(t.encode()) <= 256), max_size=3),
                   st.lists(texts, max_size=12))
    message = pb.StoppingParams(stop=draw(stops),
                                stop_token_ids=draw(mostly(st.lists(st.integers(0, 1000), max_size=3),
                                                           st.lists(uint32, max_size=80))),
                                ignore_eos=draw(st.booleans()))
    # Complete runs to the end: keep its valid lengths short; anything goes for invalid ones.
    invalid_lengths = st.sampled_from([0, 2049, 4096, 2**32 - 1])   # tiny model context: 2048
    lengths = (mostly(st.integers(1, 6), invalid_lengths) if complete
               else mostly(st.integers(1, 2000), invalid_lengths | uint32))
    if complete or draw(st.booleans()):
        message.max_tokens = draw(lengths)
    return message


@st.composite
def generate_requests(draw: st.DrawFn, complete: bool) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=draw(sampling_params()), stopping=draw(stopping_params(complete)),
                                 logprobs=draw(st.booleans()),
                                 top_logprobs=draw(mostly(st.integers(0, 20), st.integers(21, 2**32 - 1))),
                                 request_id=draw(mostly(st.sampled_from(["", "fuzz-1"]), texts)))
    kind = draw(mostly(st.sampled_from(["prompt", "chat", "token_ids"]), st.just("none")))
    if kind == "prompt":
        request.prompt = draw(mostly(texts.filter(bool), texts | huge_text))
    elif kind == "chat":
        messages = draw(st.lists(st.tuples(mostly(st.sampled_from(["system", "user", "assistant"]), roles), texts),
                                 min_size=draw(mostly(st.just(1), st.just(0))), max_size=4))
        request.chat.messages.extend(pb.ChatMessage(role=r, content=c) for r, c in messages)
        if draw(st.booleans()):
            request.chat.add_generation_prompt = draw(st.booleans())
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(mostly(st.lists(st.integers(0, 151000), min_size=1, max_size=8),
                                                 st.lists(uint32, max_size=3000))))
    return request


@st.composite
def raw_calls(draw: st.DrawFn) -> tuple[str, bytes]:
    """Bytes that are not a well-formed message: random, mutated valid ones, invalid UTF-8 in strings."""
    method = draw(st.sampled_from(METHODS))
    kind = draw(st.sampled_from(["random", "mutated", "bad_utf8"]))
    if kind == "random":
        return method, draw(st.binary(max_size=200))
    if kind == "bad_utf8":
        payload = draw(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
        return method, b"\x0a" + bytes([len(payload)]) + payload     # field 1, length-delimited
    data = bytearray(draw(generate_requests(complete=True)).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return method, bytes(data[:draw(st.integers(0, len(data)))])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module")
def server(tiny_model_path) -> Iterator[BackgroundServer]:
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu", max_batch=4, max_queue=4)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        yield ch


def _call_raw(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    path = f"/qwen_serve.v1.QwenServe/{method}"
    try:
        if method == "Generate":
            stream = channel.unary_stream(path)(payload, timeout=60)
            for count, _ in enumerate(stream):
                if count + 1 >= MAX_STREAM_EVENTS:
                    stream.cancel()
                    break
        else:
            channel.unary_unary(path)(payload, timeout=60)
    except grpc.RpcError as error:
        if error.code() == grpc.StatusCode.CANCELLED and method == "Generate":
            return grpc.StatusCode.OK       # our own cancel after a well-formed start
        return error.code()
    return grpc.StatusCode.OK


def _record(method: str, code: grpc.StatusCode) -> None:
    OUTCOMES[f"{method}:{code.name}"] += 1
    assert code in ALLOWED, f"{method} answered {code.name}"


FUZZ_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@FUZZ_SETTINGS
@given(request=generate_requests(complete=False))
def test_fuzzed_generate(channel: grpc.Channel, request: pb.GenerateRequest) -> None:
    _record("Generate", _call_raw(channel, "Generate", request.SerializeToString()))


@FUZZ_SETTINGS
@given(request=generate_requests(complete=True))
def test_fuzzed_complete(channel: grpc.Channel, request: pb.GenerateRequest) -> None:
    _record("Complete", _call_raw(channel, "Complete", request.SerializeToString()))


@FUZZ_SETTINGS
@given(call=raw_calls())
def test_fuzzed_raw_bytes(channel: grpc.Channel, call: tuple[str, bytes]) -> None:
    method, payload = call
    _record(method, _call_raw(channel, method, payload))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=texts | huge_text, ids=st.lists(uint32, max_size=50))
def test_fuzzed_tokenize_and_detokenize(channel: grpc.Channel, text: str, ids: list[int]) -> None:
    _record("Tokenize", _call_raw(channel, "Tokenize", pb.TokenizeRequest(text=text).SerializeToString()))
    _record("Detokenize", _call_raw(channel, "Detokenize", pb.DetokenizeRequest(ids=ids).SerializeToString()))


def test_server_is_healthy_after_the_fuzzing(server: BackgroundServer, capsys: pytest.CaptureFixture[str]) -> None:
    total = sum(OUTCOMES.values())
    with capsys.disabled():   # the count shows in CI logs without -s
        print(f"\nrequests fuzzed: {total}; outcomes: {dict(sorted(OUTCOMES.items()))}")
    assert total >= 300, "the fuzz tests above must run first (same module)"
    with QwenClient(server.target, timeout_s=30) as client:
        assert client.health() == "SERVING"
        done = client.complete("still here", GenerateOptions(max_tokens=3, ignore_eos=True))
        assert done.finished.completion_tokens == 3
        deadline = time.monotonic() + 5
        while True:
            info = client.model_info()
            if info["running_requests"] == 0 and info["kv_blocks_free"] == info["kv_blocks_total"]:
                break
            assert time.monotonic() < deadline, f"requests or KV blocks left over: {info}"
            time.sleep(0.05)
