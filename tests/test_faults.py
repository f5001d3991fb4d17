"""Faults of the worker process: kill -9 mid-stream (UNAVAILABLE within 1 s, restart, new request
succeeds, no /dev/shm leak after 10 restarts) and a hang (SIGSTOP) caught by the heartbeat."""
from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from gpu_worker.ipc.channel import segment_prefix
from gpu_worker.ipc.ring import shm_dir
from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from server.worker_client import FinishedEvent, TokenEvent, WorkerClient, WorkerUnavailable

LONG = StoppingParams(max_tokens=100_000, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("faults") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return path


def segments(client: WorkerClient) -> list[str]:
    return sorted(p.name for p in shm_dir().glob(segment_prefix(client.process.socket_dir) + "-*"))


async def wait_until(predicate, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


async def stream_until_failure(client: WorkerClient, request_id: str, started: asyncio.Event) -> float:
    """Consume a never-ending stream; return the monotonic time at which it failed."""
    try:
        async for ev in client.generate(request_id, [3, 1, 4, 1, 5], SamplingParams(seed=9), LONG):
            if isinstance(ev, TokenEvent):
                started.set()
    except WorkerUnavailable:
        return time.monotonic()
    raise AssertionError("stream ended without WorkerUnavailable")


async def succeeds(client: WorkerClient, request_id: str) -> bool:
    events = [ev async for ev in client.generate(request_id, [7, 7], SamplingParams(seed=1),
                                                 StoppingParams(max_tokens=4, ignore_eos=True))]
    return isinstance(events[-1], FinishedEvent) and len(events) == 5


def test_kill9_mid_stream_then_ten_restarts_leak_nothing(model_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> tuple[list[float], list[bool], int]:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=64, heartbeat_timeout_s=10)
        states: list[bool] = []
        client.on_state_change(states.append)
        await client.start()
        try:
            started = [asyncio.Event() for _ in range(8)]
            tasks = [asyncio.create_task(stream_until_failure(client, f"s{i}", started[i])) for i in range(8)]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
            killed_at = time.monotonic()
            os.kill(client.worker_pid, signal.SIGKILL)
            failed_at = await asyncio.wait_for(asyncio.gather(*tasks), 5)
            delays = [t - killed_at for t in failed_at]
            await wait_until(lambda: client.is_serving, 60)
            assert await succeeds(client, "after-first-restart")
            for i in range(10):
                pid = client.worker_pid
                os.kill(pid, signal.SIGKILL)
                await wait_until(lambda old=pid: client.is_serving and client.worker_pid != old, 60)
                assert await succeeds(client, f"after-restart-{i}")
                assert len(segments(client)) == 2          # only the live worker's two rings
            return delays, states, client.restart_count
        finally:
            await client.close()
            assert segments(client) == []
            assert not client.process.socket_dir.exists()

    delays, states, restarts = asyncio.run(main())
    with capsys.disabled():   # shows in CI logs without -s
        print(f"\nkill -9: {len(delays)} in-flight streams got UNAVAILABLE after "
              f"{', '.join(f'{d * 1000:.0f}' for d in sorted(delays))} ms; restarts survived: {restarts}")
    assert max(delays) < 1.0
    assert restarts == 11
    assert states[:3] == [True, False, True] and states.count(False) == 11


def test_hung_worker_is_detected_by_heartbeat_and_replaced(model_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    async def main() -> None:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=64, heartbeat_timeout_s=1.0,
                              heartbeat_interval_s=0.05)
        await client.start()
        try:
            started = asyncio.Event()
            task = asyncio.create_task(stream_until_failure(client, "hung", started))
            await asyncio.wait_for(started.wait(), 30)
            hung_pid = client.worker_pid
            stopped_at = time.monotonic()
            os.kill(hung_pid, signal.SIGSTOP)                  # alive, socket open, no progress
            failed_at = await asyncio.wait_for(task, 10)
            with capsys.disabled():   # shows in CI logs without -s
                print(f"\nhang (SIGSTOP) detected after {failed_at - stopped_at:.2f} s")
            assert 1.0 <= failed_at - stopped_at < 3.0
            await wait_until(lambda: client.is_serving, 60)
            assert client.worker_pid != hung_pid
            with pytest.raises(ProcessLookupError):
                os.kill(hung_pid, 0)                           # the hung worker was killed and reaped
            assert await succeeds(client, "after-hang")
        finally:
            await client.close()

    asyncio.run(main())
