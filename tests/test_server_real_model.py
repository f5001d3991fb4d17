"""The real default model (Q4_K_M) behind the front-end on the CPU backend."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from qwen_client import GenerateOptions, QwenClient, TokenDelta

from server.background import BackgroundServer
from server.config import ServeConfig

pytestmark = pytest.mark.real_model
HAIKU = [("user", "Write a haiku about autumn leaves")]


@pytest.fixture(scope="module")
def client(real_model_path) -> Iterator[QwenClient]:
    config = ServeConfig(port=0, model_path=str(real_model_path), backend="cpu", kv_cache_gb=0.25)
    with BackgroundServer(config) as server, QwenClient(server.target, timeout_s=300) as qwen:
        yield qwen


def test_model_info_describes_the_real_file(client: QwenClient) -> None:
    info = client.model_info()
    assert (info["architecture"], info["num_layers"], info["hidden_size"]) == ("qwen2", 24, 896)
    assert (info["context_length"], info["vocab_size"]) == (32768, 151936)
    assert {"Q4_K", "Q6_K", "Q8_0"} <= set(info["quant_types"])


def test_chat_stream_equals_unary_with_the_real_model(client: QwenClient) -> None:
    options = GenerateOptions(seed=42, temperature=0.7, top_p=0.9, max_tokens=8)
    events = list(client.chat(HAIKU, options))
    completion = client.complete(messages=HAIKU, options=options)
    streamed = "".join(e.text for e in events if isinstance(e, TokenDelta))
    assert streamed == completion.text and streamed.strip()
    assert completion.finished.reason in ("length", "eos")
    assert completion.started.prompt_tokens == len(client.tokenize(messages=HAIKU).ids)
