"""The worker on the cuda backend (GPU machines only): a synthetic model of the real shapes served
through the worker process; 16 concurrent streams == the same requests one at a time (bitwise,
logprobs included), aborts free KV, kill -9 of the GPU worker recovers."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from pathlib import Path

import pytest

from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from server.worker_client import FinishedEvent, TokenEvent, WorkerClient, WorkerUnavailable

pytestmark = [pytest.mark.gpu, pytest.mark.slow]
NUM_STREAMS = 16


@pytest.fixture(scope="module")
def cuda_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gpu_worker.backends.factory import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("cuda-worker") / "real-shapes.gguf"
    write_synthetic_gguf(path, real_shapes=True, seed=11)
    return path


def request(i: int) -> tuple[list[int], SamplingParams, StoppingParams]:
    rng = random.Random(i)
    prompt = [rng.randrange(151936) for _ in range(rng.choice([1, 7, 40, 130, 300]))]
    sampling = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 50]),
                              top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(2**63),
                              logprobs=i % 2 == 0, top_logprobs=i % 4)
    return prompt, sampling, StoppingParams(max_tokens=rng.randrange(8, 40), ignore_eos=True)


async def collect(client: WorkerClient, i: int, tag: str) -> list:
    return [ev async for ev in client.generate(f"{tag}-{i}", *request(i))]


def test_cuda_worker_batching_abort_and_restart(cuda_model_path: Path) -> None:
    async def main() -> None:
        client = WorkerClient(str(cuda_model_path), "cuda", num_kv_blocks=1024, max_batch=16,
                              max_tokens_per_step=512, start_timeout_s=300)
        t0 = time.monotonic()
        await client.start()
        print(f"cuda worker ready in {time.monotonic() - t0:.1f} s on {client.model_info['device_name']}")
        try:
            assert client.model_info["backend"] == "cuda"
            alone = [await collect(client, i, "alone") for i in range(NUM_STREAMS)]
            t0 = time.monotonic()
            batched = await asyncio.gather(*[collect(client, i, "batch") for i in range(NUM_STREAMS)])
            elapsed = time.monotonic() - t0
            num_tokens = sum(len(b) - 1 for b in batched)
            print(f"{NUM_STREAMS} concurrent streams: {num_tokens} tokens in {elapsed:.2f} s")
            for i in range(NUM_STREAMS):
                assert isinstance(batched[i][-1], FinishedEvent)
                assert [(e.token_id, e.logprobs) for e in batched[i][:-1]] == \
                    [(e.token_id, e.logprobs) for e in alone[i][:-1]], f"stream {i} changed in a batch"

            gen = client.generate("abort", [1, 2, 3], SamplingParams(seed=1),
                                  StoppingParams(max_tokens=5000, ignore_eos=True))
            assert isinstance(await anext(gen), TokenEvent)
            await gen.aclose()
            stats = await client.stats()
            assert (stats["kv_blocks_used"], stats["running"]) == (0, 0)

            gen = client.generate("killed", [1, 2, 3], SamplingParams(seed=1),
                                  StoppingParams(max_tokens=5000, ignore_eos=True))
            await anext(gen)
            killed_at = time.monotonic()
            os.kill(client.worker_pid, signal.SIGKILL)
            with pytest.raises(WorkerUnavailable):
                async for _ in gen:
                    pass
            assert time.monotonic() - killed_at < 1.0
            while not client.is_serving:
                assert time.monotonic() - killed_at < 300
                await asyncio.sleep(0.1)
            print(f"cuda worker restarted in {time.monotonic() - killed_at:.1f} s")
            again = await collect(client, 3, "after-restart")
            assert [e.token_id for e in again[:-1]] == [e.token_id for e in alone[3][:-1]]
        finally:
            await client.close()

    asyncio.run(main())
