"""Load: 320 concurrent streams on the tiny model (cpu backend) with mixed lengths, random
aborts, early closes and deadlines, a KV cache small enough to force queueing and preemption.
Every finished stream equals that request run alone; every cancelled stream is a prefix of it;
none is lost or duplicated; all KV blocks are free at the end; the client holds no state."""
from __future__ import annotations

import asyncio
import random
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
from server.worker_client import FinishedEvent, WorkerClient

NUM_STREAMS = 320


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("load") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return path


def request(i: int) -> tuple[list[int], SamplingParams, StoppingParams, str, float]:
    """(prompt, sampling, stopping, fate, fate parameter); fate in run | abort | close | deadline."""
    rng = random.Random(i)
    prompt = [rng.randrange(1, 268) for _ in range(rng.randrange(1, 70))]
    sampling = SamplingParams(temperature=rng.choice([0.0, 0.7, 1.0]), top_k=rng.choice([0, 20]),
                              seed=rng.randrange(2**63))
    stopping = StoppingParams(max_tokens=rng.randrange(1, 48), ignore_eos=rng.random() < 0.5)
    fate = rng.choices(["run", "abort", "close", "deadline"], weights=[5, 1, 1, 1])[0]
    return prompt, sampling, stopping, fate, rng.random()


def alone_outputs(model_path: Path) -> dict[int, list[int]]:
    model = load_gguf(model_path)
    engine = create_engine(model, CpuBackend(model), 32, 8, max_batch=1, max_tokens_per_step=64)
    out = {}
    for i in range(NUM_STREAMS):
        prompt, sampling, stopping, _, _ = request(i)
        engine.add_request(RequestSpec(i, tuple(prompt), sampling, stopping))
        events = []
        while engine.has_work:
            events += engine.step()
        out[i] = [e.token_id for e in events if isinstance(e, TokenOut)]
    return out


async def one_stream(client: WorkerClient, i: int) -> tuple[str, list[int]]:
    prompt, sampling, stopping, fate, param = request(i)
    tokens: list[int] = []
    request_id = f"load-{i}"

    async def consume() -> str:
        gen = client.generate(request_id, prompt, sampling, stopping)
        try:
            async for ev in gen:
                if isinstance(ev, FinishedEvent):
                    assert ev.completion_tokens == len(tokens)
                    return ev.reason
                tokens.append(ev.token_id)
                if fate == "abort" and len(tokens) == 1 + int(param * 4):
                    await client.abort(request_id)
                if fate == "close" and len(tokens) == 1 + int(param * 4):
                    return "closed"
        finally:
            await gen.aclose()
        raise AssertionError("stream ended without a FinishedEvent")

    if fate != "deadline":
        return await consume(), tokens
    try:
        return await asyncio.wait_for(consume(), 0.05 + 3 * param), tokens
    except TimeoutError:
        return "deadline", tokens


def test_load_with_random_cancellations(model_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = alone_outputs(model_path)

    async def main() -> tuple[list[tuple[str, list[int]]], dict, int]:
        client = WorkerClient(str(model_path), "cpu", num_kv_blocks=96, block_size=8, max_batch=48,
                              max_tokens_per_step=256)
        await client.start()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*[one_stream(client, i) for i in range(NUM_STREAMS)]), 240)
            stats = await client.stats()
            return results, stats, len(client._streams) + len(client._keys)
        finally:
            await client.close()

    t0 = time.monotonic()
    results, stats, client_state = asyncio.run(main())
    outcomes = [r for r, _ in results]
    counts = {k: outcomes.count(k) for k in sorted(set(outcomes))}
    with capsys.disabled():   # shows in CI logs without -s
        print(f"\nstreams run (worker client): {NUM_STREAMS} in {time.monotonic() - t0:.1f} s, "
              f"outcomes {counts}, steps {stats['steps']}, preemptions {stats['preemptions']}")
    for i, (outcome, tokens) in enumerate(results):
        if outcome in ("eos", "length"):
            assert tokens == expected[i], f"stream {i} differs from its run alone"
        else:
            assert outcome in ("cancelled", "closed", "deadline"), outcome
            assert tokens == expected[i][:len(tokens)], f"cancelled stream {i} is not a prefix"
    assert counts.get("eos", 0) + counts.get("length", 0) >= NUM_STREAMS // 2
    assert counts.get("cancelled", 0) > 0 and counts.get("closed", 0) > 0
    assert stats["preemptions"] > 0
    assert (stats["kv_blocks_used"], stats["running"], stats["waiting"]) == (0, 0, 0)
    assert client_state == 0
