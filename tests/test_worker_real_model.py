"""End to end on the real default model (cpu backend): model info through the handshake, two
concurrent streams through the worker process == the same requests run alone in-process."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.engine.engine import TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.text.tokenizer import Tokenizer
from gpu_worker.worker_main import create_engine
from server.worker_client import FinishedEvent, TokenEvent, WorkerClient

pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def requests(tokenizer: Tokenizer) -> list[tuple[list[int], SamplingParams, StoppingParams]]:
    chat = tokenizer.encode_chat([{"role": "user", "content": "Write a haiku about autumn leaves"}])
    stopping = StoppingParams(max_tokens=6, eos_token_ids=tokenizer.stop_token_ids)
    return [(chat, SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2), stopping),
            (tokenizer.encode("def fibonacci(n):"), SamplingParams(temperature=0.8, seed=42), stopping)]


def alone(model_path: Path, reqs) -> list[list[int]]:
    model = load_gguf(model_path)
    backend = CpuBackend(model)
    engine = create_engine(model, backend, 16, 16, max_batch=1, max_tokens_per_step=256)
    outputs = []
    for key, (prompt, sampling, stopping) in enumerate(reqs):
        engine.add_request(RequestSpec(key, tuple(prompt), sampling, stopping))
        events = []
        while engine.has_work:
            events += engine.step()
        outputs.append([e.token_id for e in events if isinstance(e, TokenOut)])
    backend.close()
    model.close()
    return outputs


def test_real_model_through_the_worker_equals_in_process(real_model_path: Path) -> None:
    tokenizer = Tokenizer.from_gguf(real_model_path)
    reqs = requests(tokenizer)
    expected = alone(real_model_path, reqs)

    async def main():
        client = WorkerClient(str(real_model_path), "cpu", num_kv_blocks=32)
        await client.start()
        try:
            async def one(i: int) -> list:
                return [ev async for ev in client.generate(f"real-{i}", *reqs[i])]
            return client.model_info, await asyncio.gather(one(0), one(1))
        finally:
            await client.close()

    info, results = asyncio.run(main())
    assert info["architecture"] == "qwen2" and info["context_length"] == 32768
    assert info["vocab_size"] == 151936 and info["tokenizer_kind"] == "gpt2"
    assert info["eos_token_ids"] == [151643, 151645]
    assert info["quant_types"] == {"F32": 121, "Q4_K": 12, "Q5_0": 133, "Q6_K": 12, "Q8_0": 13}
    assert info["kv_bytes"] == 32 * 16 * 12288 and info["weight_bytes"] > 0
    for i, events in enumerate(results):
        tokens = [e.token_id for e in events if isinstance(e, TokenEvent)]
        assert tokens == expected[i]
        assert isinstance(events[-1], FinishedEvent) and events[-1].completion_tokens == len(tokens)
    print("greedy:", repr(tokenizer.decode(expected[0])), "| sampled:", repr(tokenizer.decode(expected[1])))
    assert all(isinstance(e.logprobs.top, tuple) and len(e.logprobs.top) == 2
               for e in results[0] if isinstance(e, TokenEvent))
