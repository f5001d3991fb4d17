"""Prefix caching on the real default model (cpu backend): two chats sharing a system prompt;
the second reuses the cached blocks of the shared prefix, computes only the rest, and its greedy
tokens and logprobs equal those of an engine without the cache, bit for bit."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu_worker.engine.engine import Engine, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.text.tokenizer import Tokenizer
from gpu_worker.worker_main import create_engine
from tests.test_prefix_cache import CountingCpuBackend

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

SYSTEM = ("You are a careful senior Python reviewer. Answer in one short sentence, name the bug "
          "first, never apologise, and prefer the standard library over third-party packages.")



def chat(tokenizer: Tokenizer, key: int, question: str) -> RequestSpec:
    prompt = tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    return RequestSpec(key, tuple(prompt), SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2),
                       StoppingParams(max_tokens=3, eos_token_ids=tokenizer.stop_token_ids))


def generate(engine: Engine, spec: RequestSpec) -> list[TokenOut]:
    events = engine.add_request(spec)
    while engine.has_work:
        events += engine.step()
    return [e for e in events if isinstance(e, TokenOut)]


def test_shared_system_prompt_is_computed_once_and_changes_nothing(real_model_path: Path) -> None:
    tokenizer = Tokenizer.from_gguf(real_model_path)
    first = chat(tokenizer, 1, "Why does `x = []; x.append(x)` not crash?")
    second = chat(tokenizer, 2, "What is wrong with `def f(a=[]): a.append(1)`?")
    shared = next(i for i, (a, b) in enumerate(zip(first.prompt_token_ids, second.prompt_token_ids)) if a != b)
    block_size = 16
    assert shared >= 2 * block_size
    model = load_gguf(real_model_path)
    backend = CountingCpuBackend(model)
    try:
        uncached = create_engine(model, backend, 16, block_size, max_batch=1, prefix_cache=False)
        expected = generate(uncached, second)
        assert backend.tokens_per_step[0] == len(second.prompt_token_ids)
        cached = create_engine(model, backend, 16, block_size, max_batch=1, prefix_cache=True)
        generate(cached, first)
        backend.tokens_per_step.clear()
        assert generate(cached, second) == expected
        reused = shared // block_size * block_size
        assert cached.stats()["prefix_cache_hit_tokens"] == reused
        assert backend.tokens_per_step[0] == len(second.prompt_token_ids) - reused
    finally:
        backend.close()
        model.close()
