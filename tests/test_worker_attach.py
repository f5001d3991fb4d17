"""Two-process attach mode: the worker is started on its own with a socket dir (as in the compose
stack) and front-ends attach to it; one front-end at a time; a front-end leaving aborts its
requests; a worker restarted by someone else is re-attached with fresh rings."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpu_worker.ipc.channel import segment_prefix, socket_path
from gpu_worker.ipc.ring import shm_dir
from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from server.worker_client import FinishedEvent, TokenEvent, WorkerClient, WorkerUnavailable

REPO_ROOT = Path(__file__).resolve().parents[1]
LONG = StoppingParams(max_tokens=100_000, ignore_eos=True)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("attach") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return path


def start_worker(model_path: Path, socket_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "gpu_worker.worker_main", "--model", str(model_path),
                             "--backend", "cpu", "--socket-dir", str(socket_dir), "--num-kv-blocks", "32",
                             "--log-level", "WARNING"], env=env)


def segments(socket_dir: Path) -> list[str]:
    return sorted(p.name for p in shm_dir().glob(segment_prefix(socket_dir) + "-*"))


async def short_request(client: WorkerClient, request_id: str) -> list:
    return [ev async for ev in client.generate(request_id, [5, 6, 7], SamplingParams(seed=3),
                                               StoppingParams(max_tokens=5, ignore_eos=True))]


async def wait_until(predicate, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


def test_attach_one_at_a_time_leave_and_worker_restart(model_path: Path, tmp_path: Path) -> None:
    sock_dir = tmp_path / "ipc"
    worker = start_worker(model_path, sock_dir)
    replacement: subprocess.Popen | None = None

    async def main() -> subprocess.Popen:
        first = WorkerClient(str(model_path), socket_dir=str(sock_dir), attach=True, start_timeout_s=60)
        await first.start()
        assert len(await short_request(first, "a")) == 6
        busy = WorkerClient(str(model_path), socket_dir=str(sock_dir), attach=True, start_timeout_s=0.5)
        with pytest.raises(TimeoutError):
            await busy.start()                                   # the worker serves one front-end
        leaving = first.generate("left-behind", [1, 2], SamplingParams(seed=1), LONG)
        assert isinstance(await anext(leaving), TokenEvent)
        await first.close()
        assert worker.poll() is None                             # attached close leaves it running

        second = WorkerClient(str(model_path), socket_dir=str(sock_dir), attach=True, start_timeout_s=30)
        await second.start()
        stats = await second.stats()
        assert (stats["kv_blocks_used"], stats["running"]) == (0, 0)   # first's request was aborted
        old_segments = segments(sock_dir)
        assert len(old_segments) == 2
        in_flight = second.generate("in-flight", [1, 2], SamplingParams(seed=2), LONG)
        await anext(in_flight)
        worker.kill()
        with pytest.raises(WorkerUnavailable):
            async for _ in in_flight:
                pass
        assert not second.is_serving
        new_worker = start_worker(model_path, sock_dir)          # restarted by its supervisor
        await wait_until(lambda: second.is_serving, 60)
        events = await short_request(second, "after-restart")
        assert isinstance(events[-1], FinishedEvent) and len(events) == 6
        new_segments = segments(sock_dir)
        assert len(new_segments) == 2 and not set(new_segments) & set(old_segments)
        await second.close()
        return new_worker

    try:
        replacement = asyncio.run(main())
        replacement.send_signal(signal.SIGTERM)
        assert replacement.wait(10) == 0
        assert not socket_path(sock_dir).exists() and segments(sock_dir) == []
    finally:
        for proc in (worker, replacement):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
