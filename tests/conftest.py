"""Shared fixtures: the real default model (skip when absent) and a tiny synthetic model."""
from __future__ import annotations

from pathlib import Path

import pytest

from gpu_worker.model.fetch import default_model_path
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.synthetic import write_synthetic_gguf


@pytest.fixture(scope="session")
def real_model_path() -> Path:
    """The fetched default model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M); tests skip when it is absent
    (`make test` fetches it first, so in CI it is present)."""
    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"default model not present at {path} (run `qwen-serve fetch-model`)")
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random qwen2 GGUF (2 layers, hidden 64, 4/2 heads, ffn 128, Q8_0 weights, seed 0),
    written once per session. It carries the real model's tokenizer metadata (vocab 151936, chat
    template) when the real model is present, else a small byte-level vocabulary (269 tokens)."""
    real = default_model_path()
    path = tmp_path_factory.mktemp("models") / "tiny-qwen2-q8_0.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=real if real.is_file() else None)
    return path


@pytest.fixture(scope="session")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random qwen2 with the 269-token byte vocabulary, loaded: engine tests sample a lot,
    and sampling over 151936 ids costs ~14 ms a token in numpy."""
    path = tmp_path_factory.mktemp("small-vocab") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    model = load_gguf(path)
    yield model
    model.close()
