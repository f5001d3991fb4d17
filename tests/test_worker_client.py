"""WorkerClient with an owned worker process (tiny model, cpu backend): streams equal the
in-process engine's output, 16 concurrent streams unchanged by batching, cancel/abort free KV,
bad requests rejected, ring overflow handled by back-pressure across processes."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.engine.engine import TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.worker_main import create_engine
from server.worker_client import (
    FinishedEvent,
    TokenEvent,
    WorkerClient,
    WorkerRequestError,
    WorkerUnavailable,
    _Mailbox,
    _Pacing,
    _WakeQueue,
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny random qwen2 with a 269-token vocabulary (sampling 151936 ids costs ~14 ms a token)."""
    path = tmp_path_factory.mktemp("wc") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return path


def params(i: int, top_logprobs: int | None = None) -> tuple[list[int], SamplingParams, StoppingParams]:
    prompt = [(i * 13 + j * 7) % 250 + 1 for j in range(2 + (i * 5) % 23)]
    top = i % 4 if top_logprobs is None else top_logprobs
    sampling = SamplingParams(temperature=0.0 if i % 5 == 0 else 0.8, top_p=0.95, seed=i * 7919,
                              logprobs=i % 2 == 1 or top > 0, top_logprobs=top)
    return prompt, sampling, StoppingParams(max_tokens=8 + i % 9)


def expected_alone(model_path: Path, indexes: list[int], top_logprobs: int | None = None
                   ) -> dict[int, list[TokenOut]]:
    """Each request run alone through an in-process engine on the same backend."""
    model = load_gguf(model_path)
    out = {}
    for i in indexes:
        engine = create_engine(model, CpuBackend(model), 64, 16, max_batch=1, max_tokens_per_step=512)
        prompt, sampling, stopping = params(i, top_logprobs)
        engine.add_request(RequestSpec(1, tuple(prompt), sampling, stopping))
        events = []
        while engine.has_work:
            events += engine.step()
        out[i] = [e for e in events if isinstance(e, TokenOut)]
    return out


async def collect(client: WorkerClient, request_id: str, i: int, top_logprobs: int | None = None) -> list:
    prompt, sampling, stopping = params(i, top_logprobs)
    return [ev async for ev in client.generate(request_id, prompt, sampling, stopping)]


def test_16_concurrent_streams_equal_each_request_alone(model_path: Path) -> None:
    expected = expected_alone(model_path, list(range(16)))

    async def main() -> list[list]:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=64, max_batch=16)
        await client.start()
        try:
            assert client.is_serving and client.model_info["vocab_size"] == 269
            assert client.model_info["kv_blocks_total"] == 64 and client.model_info["backend"] == "cpu"
            return await asyncio.gather(*[collect(client, f"req-{i}", i) for i in range(16)])
        finally:
            await client.close()

    results = asyncio.run(main())
    for i, events in enumerate(results):
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [(t.token_id, t.logprobs) for t in tokens] == \
            [(t.token_id, t.logprobs) for t in expected[i]], f"request {i} differs"
        finished = events[-1]
        assert isinstance(finished, FinishedEvent) and events.count(finished) == 1
        assert finished.completion_tokens == len(tokens)
        assert finished.prompt_tokens == len(params(i)[0])
        assert finished.ttft_ns > 0 and finished.queue_ns >= 0


def test_paced_streams_carry_the_same_tokens_in_fewer_deliveries(model_path: Path) -> None:
    """16 streams paced at 50 messages/s (a 320 ms interval while all generate): every stream still
    gets exactly its tokens, in fewer deliveries; the pacing counts only generating streams and is
    back to zero afterwards."""
    expected = expected_alone(model_path, list(range(16)))
    seen_generating: list[int] = []

    async def batches_of(client: WorkerClient, i: int) -> list[list]:
        prompt, sampling, stopping = params(i)
        out = []
        async for batch in client.generate_batches(f"paced-{i}", prompt, sampling, stopping):
            out.append(batch)
            seen_generating.append(client._pacing.generating)
        return out

    async def main() -> tuple[list[list[list]], int]:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=64, max_batch=16, stream_messages_per_s=50)
        await client.start()
        try:
            results = await asyncio.gather(*[batches_of(client, i) for i in range(16)])
            return results, client._pacing.generating
        finally:
            await client.close()

    results, generating_after = asyncio.run(main())
    assert generating_after == 0 and 1 <= max(seen_generating) <= 16
    for i, batches in enumerate(results):
        events = [event for batch in batches for event in batch]
        tokens = [e for e in events if isinstance(e, TokenEvent)]
        assert [(t.token_id, t.logprobs) for t in tokens] == [(t.token_id, t.logprobs) for t in expected[i]]
        assert isinstance(events[-1], FinishedEvent)
    deliveries = sum(len(batches) for batches in results)
    total_tokens = sum(len(expected[i]) for i in range(16))
    print(f"paced: {total_tokens} tokens + 16 ends in {deliveries} deliveries")
    assert deliveries < total_tokens


def test_cancel_and_abort_free_kv_and_bad_requests_are_rejected(model_path: Path) -> None:
    async def main() -> None:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=64, block_size=4)
        await client.start()
        try:
            long = StoppingParams(max_tokens=1000, ignore_eos=True)
            gen = client.generate("cancel-me", [1, 2, 3], SamplingParams(seed=1), long)
            assert isinstance(await gen.__anext__(), TokenEvent)
            other = client.generate("abort-me", [4, 5, 6], SamplingParams(seed=2), long)
            await other.__anext__()
            assert (await client.stats())["kv_blocks_used"] > 0
            await gen.aclose()                                 # client went away
            assert await client.abort("abort-me")
            tail = [ev async for ev in other]
            assert isinstance(tail[-1], FinishedEvent) and tail[-1].reason == "cancelled"
            assert not await client.abort("abort-me") and not await client.abort("never-sent")
            stats = await client.stats()                       # ABORT was sent before this request
            assert (stats["kv_blocks_used"], stats["running"], stats["waiting"]) == (0, 0, 0)
            assert stats["kv_blocks_free"] == 64
            with pytest.raises(WorkerRequestError, match="outside the vocabulary"):
                await anext(client.generate("bad", [1, 269], SamplingParams(), StoppingParams()))
            with pytest.raises(ValueError):
                await anext(client.generate("empty", [], SamplingParams(), StoppingParams()))
            assert len(await collect(client, "still-fine", 3)) > 1
            client.latest_stats = {}
            await asyncio.sleep(1.2)                           # the worker pushes stats once a second
            assert client.latest_stats["kv_blocks_total"] == 64
        finally:
            await client.close()
        assert client.process.proc is not None and client.process.proc.returncode == 0   # clean SHUTDOWN
        with pytest.raises(WorkerUnavailable):
            await anext(client.generate("closed", [1], SamplingParams(), StoppingParams()))

    asyncio.run(main())


def test_tiny_rings_apply_back_pressure_without_loss(model_path: Path) -> None:
    """4 KiB rings: 32 submits to a frozen worker, and per-step token records with 20 logprob
    alternatives to a front-end that does not read for 0.5 s, do not fit; both sides wait for space
    and everything still arrives, in order, equal to each request run alone."""
    expected = expected_alone(model_path, list(range(32)), top_logprobs=20)

    async def main() -> tuple[list[list], int, int]:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=128, max_batch=32,
                              request_ring_bytes=4096, event_ring_bytes=4096)
        await client.start()
        try:
            os.kill(client.worker_pid, signal.SIGSTOP)        # worker frozen: the request ring fills
            tasks = [asyncio.create_task(collect(client, f"r{i}", i, top_logprobs=20)) for i in range(32)]
            await asyncio.sleep(0.2)
            request_waits = client.request_ring_full_count
            os.kill(client.worker_pid, signal.SIGCONT)
            time.sleep(0.5)  # noqa: ASYNC251 -- deliberately blocks the loop: the event ring fills
            results = await asyncio.gather(*tasks)
            return results, request_waits, (await client.stats())["event_ring_full"]
        finally:
            await client.close()

    results, request_waits, event_waits = asyncio.run(main())
    print(f"back-pressure waits: request ring {request_waits}, event ring {event_waits}")
    assert request_waits > 0 and event_waits > 0
    for i, events in enumerate(results):
        assert [(e.token_id, e.logprobs) for e in events[:-1]] == \
            [(t.token_id, t.logprobs) for t in expected[i]]
        assert isinstance(events[-1], FinishedEvent)


def test_waiting_streams_are_woken_a_round_per_loop_iteration() -> None:
    """_WakeQueue: readers that received events wake `per_round` per event-loop iteration (so that
    grpc.aio's one accept per iteration is not starved), each once however many events it got, and
    a reader that was not waiting is not queued (it finds its events when it next takes them)."""

    async def scenario() -> list[int]:
        wakes = _WakeQueue(per_round=16)
        mailboxes = [_Mailbox() for _ in range(40)]
        readers = [asyncio.ensure_future(mailbox.take_all()) for mailbox in mailboxes]
        await asyncio.sleep(0)                        # every reader waits
        busy = _Mailbox()                             # no reader waiting
        assert not busy.add(TokenEvent(7))
        for mailbox in mailboxes:
            for token in (1, 2):
                if mailbox.add(TokenEvent(token)):
                    wakes.push(mailbox)
        wakes.start()
        woken = []
        for _ in range(4):
            await asyncio.sleep(0)
            woken.append(sum(reader.done() for reader in readers))
        assert all(reader.result() == [TokenEvent(1), TokenEvent(2)] for reader in readers)
        assert await busy.take_all() == [TokenEvent(7)]
        return woken

    assert asyncio.run(scenario()) == [16, 32, 40, 40]


async def _collect(mailbox: _Mailbox, into: list[tuple[float, list[object]]]) -> None:
    """A reader like generate_batches: (loop time, items) per delivery, until a FinishedEvent."""
    loop = asyncio.get_running_loop()
    while True:
        items = await mailbox.take_all()
        into.append((loop.time(), items))
        if any(isinstance(item, (FinishedEvent, BaseException)) for item in items):
            return


def generating(pacing: _Pacing, count: int) -> _Pacing:
    for _ in range(count):
        pacing.stream_started()
    return pacing


def test_pacing_interval_is_generating_streams_over_the_message_rate() -> None:
    pacing = generating(_Pacing(messages_per_s=8000), 256)
    assert pacing.interval_s == pytest.approx(0.032)
    for _ in range(255):
        pacing.stream_ended()
    assert pacing.interval_s == pytest.approx(1 / 8000)
    assert generating(_Pacing(messages_per_s=0), 256).interval_s == 0.0
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="messages per second must be >= 0"):
            _Pacing(bad)


def test_a_paced_stream_gets_its_first_token_at_once_then_one_delivery_per_interval() -> None:
    """Interval 0.3 s (3 streams at 10 messages/s): the first token goes out at once; tokens that
    follow within the interval wait, then leave together when its timer fires (through the wake
    queue); nothing is lost or reordered."""

    async def scenario() -> tuple[list[tuple[float, list[object]]], float, list[bool]]:
        loop = asyncio.get_running_loop()
        pacing, wakes = generating(_Pacing(messages_per_s=10), 3), _WakeQueue(per_round=16)
        mailbox = _Mailbox(pacing, wakes)
        deliveries: list[tuple[float, list[object]]] = []
        reader = asyncio.ensure_future(_collect(mailbox, deliveries))
        await asyncio.sleep(0)
        started = loop.time()
        needs_wake = [mailbox.add(TokenEvent(1))]             # first token: wake now
        if needs_wake[0]:
            wakes.push(mailbox)
            wakes.start()
        await asyncio.sleep(0.01)
        needs_wake += [mailbox.add(TokenEvent(2)), mailbox.add(TokenEvent(3))]   # inside the interval
        await asyncio.sleep(0.1)
        assert len(deliveries) == 1                            # 2 and 3 are still held
        await asyncio.sleep(0.35)
        mailbox.add(FinishedEvent("length", 1, 3, 0, 0, 0), urgent=True)
        mailbox.wake()
        await reader
        return deliveries, started, needs_wake

    deliveries, started, needs_wake = asyncio.run(scenario())
    assert needs_wake == [True, False, False]
    assert [items for _, items in deliveries[:2]] == [[TokenEvent(1)], [TokenEvent(2), TokenEvent(3)]]
    assert deliveries[0][0] - started < 0.05
    assert 0.3 - 0.002 <= deliveries[1][0] - deliveries[0][0] < 0.4     # the pacing timer, not later


def test_the_end_and_failures_are_not_held_by_pacing() -> None:
    """A finish (urgent add) or a failure (put) is handed over at once with the tokens held before it."""

    async def scenario(last: object) -> tuple[list[tuple[float, list[object]]], float]:
        loop = asyncio.get_running_loop()
        pacing = generating(_Pacing(messages_per_s=1), 10)     # a 10 s interval
        mailbox = _Mailbox(pacing)
        deliveries: list[tuple[float, list[object]]] = []
        reader = asyncio.ensure_future(_collect(mailbox, deliveries))
        await asyncio.sleep(0)
        assert mailbox.add(TokenEvent(1))
        mailbox.wake()
        await asyncio.sleep(0.01)
        assert not mailbox.add(TokenEvent(2))                  # held: the interval has 10 s to go
        started = loop.time()
        if isinstance(last, FinishedEvent):
            assert mailbox.add(last, urgent=True)
            mailbox.wake()
        else:
            mailbox.put(last)                                  # type: ignore[arg-type]
        await asyncio.wait_for(reader, 2)
        return deliveries, started

    finished = FinishedEvent("eos", 1, 2, 0, 0, 0)
    deliveries, started = asyncio.run(scenario(finished))
    assert [items for _, items in deliveries] == [[TokenEvent(1)], [TokenEvent(2), finished]]
    assert deliveries[1][0] - started < 0.5
    failure = WorkerUnavailable("gone")
    deliveries, started = asyncio.run(scenario(failure))
    assert [items for _, items in deliveries] == [[TokenEvent(1)], [TokenEvent(2), failure]]


def test_without_pacing_every_token_wakes_a_waiting_reader() -> None:
    async def scenario() -> list[bool]:
        mailbox = _Mailbox(_Pacing(messages_per_s=0))
        deliveries: list[tuple[float, list[object]]] = []
        reader = asyncio.ensure_future(_collect(mailbox, deliveries))
        woken = []
        for token in range(5):
            await asyncio.sleep(0)
            woken.append(mailbox.add(TokenEvent(token)))
            mailbox.wake()
        await asyncio.sleep(0)
        mailbox.add(FinishedEvent("length", 1, 5, 0, 0, 0), urgent=True)
        mailbox.wake()
        await reader
        assert [items for _, items in deliveries[:5]] == [[TokenEvent(t)] for t in range(5)]
        return woken

    assert asyncio.run(scenario()) == [True] * 5
