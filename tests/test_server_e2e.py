"""The front-end end to end: real gRPC, real worker process, CPU backend, tiny synthetic model."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qwen_client import GenerateOptions, QwenClient, QwenError, TokenDelta

from qwen_serve.v1 import generate_pb2 as pb
from qwen_serve.v1 import generate_pb2_grpc as pb_grpc
from server.background import BackgroundServer
from server.config import ServeConfig


@pytest.fixture(scope="module")
def server(tiny_model_path) -> Iterator[BackgroundServer]:
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu", max_batch=4, max_queue=2)
    with BackgroundServer(config) as running:
        yield running


@pytest.fixture()
def client(server: BackgroundServer) -> Iterator[QwenClient]:
    with QwenClient(server.target, timeout_s=60) as qwen:
        yield qwen


@pytest.fixture()
def stub(server: BackgroundServer) -> Iterator[pb_grpc.QwenServeStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield pb_grpc.QwenServeStub(channel)


def _text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenDelta))


def _wait_kv_idle(client: QwenClient, timeout_s: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = client.model_info()
        if info["running_requests"] == 0 and info["waiting_requests"] == 0 \
                and info["kv_blocks_free"] == info["kv_blocks_total"]:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"KV not idle after {timeout_s} s: {info}")
        time.sleep(0.05)


def test_health_and_model_info(client: QwenClient, tiny_model_path) -> None:
    assert client.health() == "SERVING"
    assert client.health("qwen_serve.v1.QwenServe") == "SERVING"
    info = client.model_info()
    assert info["model"] == tiny_model_path.name
    assert info["architecture"] == "qwen2" and info["backend"] == "cpu"
    assert info["num_layers"] == 2 and info["hidden_size"] == 64
    assert info["kv_blocks_total"] > 0 and info["kv_cache_bytes"] != "0"


def test_stream_equals_unary_for_the_same_seed(client: QwenClient) -> None:
    options = GenerateOptions(seed=1234, max_tokens=24, temperature=0.9, top_k=50, logprobs=True,
                              top_logprobs=2, ignore_eos=True)
    events = list(client.generate("The quick brown fox", options))
    completion = client.complete("The quick brown fox", options)
    streamed_ids = tuple(i for e in events if isinstance(e, TokenDelta) for i in e.token_ids)
    assert _text(events) == completion.text
    assert streamed_ids == completion.token_ids and len(streamed_ids) == 24
    assert completion.finished.reason == "length" and completion.finished.completion_tokens == 24
    assert events[0].seed == 1234 and completion.started.prompt_tokens == events[0].prompt_tokens
    assert [lp.token_id for lp in completion.logprobs] == list(completion.token_ids)
    assert all(len(lp.top) == 2 and lp.logprob <= 0 for lp in completion.logprobs)


def test_server_picks_and_reports_a_seed_that_reproduces(client: QwenClient) -> None:
    first = client.complete("Once upon", GenerateOptions(max_tokens=8, ignore_eos=True))
    again = client.complete("Once upon", GenerateOptions(max_tokens=8, ignore_eos=True, seed=first.started.seed))
    assert first.token_ids == again.token_ids


def test_stop_string_is_cut_across_tokens_and_not_emitted(client: QwenClient) -> None:
    options = GenerateOptions(seed=7, max_tokens=32, ignore_eos=True)
    full = client.complete("Tell me", options)
    # A stop string that straddles a token boundary in the middle of the output.
    pieces = [client.detokenize([i]) for i in full.token_ids]
    start = len(pieces[0]) + len(pieces[1]) + len(pieces[2]) - 1
    stop = full.text[start:start + 3]
    assert len(stop) == 3
    stopped = client.complete("Tell me", GenerateOptions(seed=7, max_tokens=32, ignore_eos=True, stop=(stop,)))
    assert stopped.finished.reason == "stop" and stopped.finished.matched_stop == stop
    assert stopped.text == full.text[:full.text.find(stop)]
    streamed = list(client.generate("Tell me", GenerateOptions(seed=7, max_tokens=32, ignore_eos=True,
                                                               stop=(stop,))))
    assert _text(streamed) == stopped.text
    _wait_kv_idle(client)


def test_chat_tokenize_and_detokenize(client: QwenClient) -> None:
    tokens = client.tokenize(messages=[("user", "Hi there")])
    text = client.detokenize(tokens.ids)
    assert "<|im_start|>user\nHi there<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    completion = client.complete(messages=[("user", "Hi there")],
                                 options=GenerateOptions(temperature=0, max_tokens=4))
    assert completion.started.prompt_tokens == len(tokens.ids)
    assert "".join(client.tokenize("héllo wörld").pieces) == "héllo wörld"


INVALID_OVER_THE_WIRE = [
    (pb.GenerateRequest(), "input"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(temperature=float("nan"))), "sampling.temperature"),
    (pb.GenerateRequest(prompt="hi", sampling=pb.SamplingParams(top_p=0)), "sampling.top_p"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[10**9])), "token_ids.ids[0]"),
    (pb.GenerateRequest(prompt="hi", stopping=pb.StoppingParams(max_tokens=0)), "stopping.max_tokens"),
    (pb.GenerateRequest(prompt="hi", stopping=pb.StoppingParams(max_tokens=10**6)), "stopping.max_tokens"),
    (pb.GenerateRequest(prompt="hi", top_logprobs=50), "top_logprobs"),
    (pb.GenerateRequest(chat=pb.ChatMessages(messages=[pb.ChatMessage(role="wizard")])), "chat.messages[0].role"),
    (pb.GenerateRequest(prompt="hi " * 3000), "prompt"),   # longer than the tiny model's context (2048)
]


@pytest.mark.parametrize("request_message, field", INVALID_OVER_THE_WIRE)
def test_invalid_requests_get_invalid_argument_and_the_server_keeps_serving(
        stub: pb_grpc.QwenServeStub, client: QwenClient, request_message: pb.GenerateRequest, field: str) -> None:
    for call in (lambda: list(stub.Generate(request_message, timeout=30)),
                 lambda: stub.Complete(request_message, timeout=30)):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}: ")
    assert client.complete("ok", GenerateOptions(max_tokens=1)).finished.completion_tokens == 1


def test_bytes_that_do_not_parse_are_invalid_argument(server: BackgroundServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        raw = channel.unary_unary("/qwen_serve.v1.QwenServe/Complete")
        with pytest.raises(grpc.RpcError) as caught:
            raw(b"\x0a\x02\xff\xfe", timeout=10)   # field 1 (prompt) with invalid UTF-8
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_client_cancel_frees_the_request_in_the_worker(client: QwenClient) -> None:
    stream = client.generate("Count", GenerateOptions(max_tokens=1500, ignore_eos=True))
    seen = [next(stream) for _ in range(4)]       # started + 3 tokens: the request is running
    assert client.model_info()["running_requests"] == 1 and len(seen) == 4
    stream.close()                                # cancels the RPC
    _wait_kv_idle(client, timeout_s=3)


def test_deadline_mid_stream_is_deadline_exceeded_and_frees_kv(server: BackgroundServer, client: QwenClient) -> None:
    with QwenClient(server.target, timeout_s=0.6) as hurried, pytest.raises(QwenError) as caught:
        list(hurried.generate("Count", GenerateOptions(max_tokens=1500, ignore_eos=True)))
    assert caught.value.code == "DEADLINE_EXCEEDED"
    _wait_kv_idle(client, timeout_s=3)


def test_abort_rpc_ends_the_stream_as_cancelled(client: QwenClient) -> None:
    stream = client.generate("Count", GenerateOptions(max_tokens=1500, ignore_eos=True, request_id="abort-me"))
    assert next(stream).request_id == "abort-me"
    next(stream)
    assert client.abort("abort-me") is True
    events = list(stream)
    assert events[-1].reason == "cancelled"
    assert client.abort("abort-me") is False
    _wait_kv_idle(client)


def test_admission_beyond_the_bound_is_resource_exhausted_with_a_retry_hint(
        server: BackgroundServer, client: QwenClient) -> None:
    bound = server.config.max_batch + server.config.max_queue
    streams = [client.generate("Count", GenerateOptions(max_tokens=1500, ignore_eos=True)) for _ in range(bound)]
    try:
        for stream in streams:
            next(stream)     # each admitted and started
        with pytest.raises(QwenError) as caught:
            client.complete("one too many", GenerateOptions(max_tokens=1))
        assert caught.value.code == "RESOURCE_EXHAUSTED" and caught.value.retry_after_ms == 1000
    finally:
        for stream in streams:
            stream.close()
    _wait_kv_idle(client, timeout_s=5)
    assert client.complete("room again", GenerateOptions(max_tokens=1)).finished.completion_tokens == 1


def test_concurrent_streams_each_get_their_own_tokens(client: QwenClient) -> None:
    options = [GenerateOptions(seed=seed, max_tokens=12, ignore_eos=True) for seed in range(6)]
    alone = [client.complete("Shared prompt", o).token_ids for o in options]
    together: list[tuple[int, ...]] = [()] * len(options)

    def run(index: int) -> None:
        together[index] = client.complete("Shared prompt", options[index]).token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(options))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert together == alone


def test_reflection_lists_the_services(server: BackgroundServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as channel:
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"qwen_serve.v1.QwenServe", "grpc.health.v1.Health"} <= names


def test_worker_killed_mid_stream_gives_unavailable_then_recovers(server: BackgroundServer,
                                                                  client: QwenClient) -> None:
    import os
    import signal

    serving = health_pb2.HealthCheckResponse.SERVING
    with grpc.insecure_channel(server.target) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(watch).status == serving
        stream = client.generate("Count", GenerateOptions(max_tokens=1500, ignore_eos=True))
        next(stream)
        next(stream)
        os.kill(server.running.link.worker.worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        with pytest.raises(QwenError) as caught:
            list(stream)
        assert caught.value.code == "UNAVAILABLE" and time.monotonic() - killed_at < 1.0
        # Health goes NOT_SERVING while the worker is down, then SERVING once it is restarted.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert next(watch).status == serving
        watch.cancel()
    assert client.complete("back", GenerateOptions(max_tokens=2, ignore_eos=True)).finished.completion_tokens == 2
    assert b"qwen_serve:worker_restarts_total 1.0" in server.running.metrics.render()


def test_request_id_from_metadata_reaches_started_and_logs(server: BackgroundServer, stub, caplog) -> None:
    import logging

    request = pb.GenerateRequest(prompt="hi", stopping=pb.StoppingParams(max_tokens=1))
    with caplog.at_level(logging.INFO, logger="qwen_serve"):
        reply = stub.Complete(request, metadata=(("x-request-id", "trace-77"),), timeout=30)
    assert reply.started.request_id == "trace-77"
    tagged = [r for r in caplog.records if r.getMessage() == "generation finished"]
    assert tagged and all(r.request_id == "trace-77" for r in tagged)


def test_metrics_count_tokens_and_time_to_first_token(server: BackgroundServer, client: QwenClient) -> None:
    client.complete("count me", GenerateOptions(max_tokens=3, ignore_eos=True))
    text = server.running.metrics.render().decode()
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    assert samples["qwen_serve:generation_tokens_total"] >= 3
    assert samples["qwen_serve:time_to_first_token_seconds_count"] >= 1
    assert samples['qwen_serve:requests_total{outcome="length"}'] >= 1


def test_a_reused_request_id_runs_twice_and_abort_ends_both(client: QwenClient) -> None:
    options = GenerateOptions(max_tokens=1500, ignore_eos=True, request_id="twin")
    first, second = client.generate("Count", options), client.generate("Count", options)
    assert next(first).request_id == next(second).request_id == "twin"
    next(first)
    next(second)
    assert client.abort("twin") is True
    assert list(first)[-1].reason == list(second)[-1].reason == "cancelled"
    _wait_kv_idle(client)


def test_served_tokens_equal_the_engine_run_directly(client: QwenClient, tiny_model_path) -> None:
    """Front-end + IPC change nothing: the same request on an in-process engine gives the same ids."""
    from gpu_worker.backends.cpu import CpuBackend
    from gpu_worker.engine.engine import FinishOut, TokenOut
    from gpu_worker.engine.sequence import RequestSpec
    from gpu_worker.model.gguf_loader import load_gguf
    from gpu_worker.sampling.params import SamplingParams, StoppingParams
    from gpu_worker.worker_main import create_engine

    served = client.complete("Direct engine check", GenerateOptions(seed=99, temperature=0.8, top_k=40,
                                                                    max_tokens=16, ignore_eos=True))
    prompt_ids = client.tokenize("Direct engine check").ids
    with load_gguf(tiny_model_path) as model:
        engine = create_engine(model, CpuBackend(model), num_kv_blocks=64)
        spec = RequestSpec(1, tuple(prompt_ids), SamplingParams(temperature=0.8, top_k=40, seed=99),
                           StoppingParams(max_tokens=16, ignore_eos=True))
        events = engine.add_request(spec)
        while engine.has_work:
            events += engine.step()
    direct = tuple(e.token_id for e in events if isinstance(e, TokenOut))
    assert [e.reason for e in events if isinstance(e, FinishOut)] == ["length"]
    assert served.token_ids == direct
