"""Synthetic GGUF writer (valid blocks, real layout), F16 converter and memory estimate."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from gpu_worker.model.convert import convert_to_f16
from gpu_worker.model.dequant import dequantize
from gpu_worker.model.gguf_config import expected_shapes
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.memory import estimate_memory, tensor_types_of
from gpu_worker.model.quant_types import SUPPORTED_TYPES
from gpu_worker.model.synthetic import PRESETS, main, write_synthetic_gguf

QUANT_TYPES = [t for t in sorted(SUPPORTED_TYPES, key=int) if t not in (QType.F32,)]


def _mixed_types() -> dict[str, QType]:
    """Every supported type except F32 on some 2-D weight of a 2-layer model with 256-wide rows."""
    names = ["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
             "blk.0.attn_v.weight", "blk.0.attn_output.weight", "blk.0.ffn_gate.weight",
             "blk.0.ffn_up.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
    assert len(names) == len(QUANT_TYPES)
    return dict(zip(names, QUANT_TYPES))


@pytest.fixture(scope="module")
def mixed_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mixed") / "mixed.gguf"
    written = write_synthetic_gguf(path, num_layers=2, hidden=256, heads=4, kv_heads=2, ffn=512,
                                   weight_type=_mixed_types(), seed=5)
    assert {written[n] for n in _mixed_types()} == set(QUANT_TYPES)
    return path


def test_synthetic_blocks_are_valid_and_sane(mixed_model: Path) -> None:
    with load_gguf(mixed_model) as model:
        for name, qtype in _mixed_types().items():
            assert model.tensors[name].qtype == qtype
        for name, tensor in model.tensors.items():
            values = dequantize(tensor)
            assert np.isfinite(values).all(), name
            if name.endswith("norm.weight"):
                assert abs(values.mean() - 1.0) < 0.05, name
            else:                                   # weights and biases ~N(0, 0.02)-ish
                assert 0.005 < values.std() < 0.06 and abs(values.mean()) < 0.01, (name, values.std())


def test_synthetic_metadata_layout(tmp_path: Path) -> None:
    path = tmp_path / "s.gguf"
    written = write_synthetic_gguf(path, num_layers=3, hidden=96, heads=6, kv_heads=3, ffn=160, context=512,
                                   seed=2, rope_freq_base=5e5)
    with load_gguf(path) as model:
        c = model.config
        assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size) == (3, 96, 6, 3, 160)
        assert (c.context_length, c.rope_freq_base, c.vocab_size) == (512, 5e5, 269)
        tokens = model.metadata["tokenizer.ggml.tokens"]
        assert tokens[c.eos_token_id] == "<|im_end|>" and "<|im_start|>" in tokens
        assert model.metadata["tokenizer.ggml.model"] == "gpt2" and model.metadata["tokenizer.ggml.merges"]
        assert set(written) == set(model.tensors) == set(expected_shapes(c))
        assert model.tensors["blk.2.attn_v.bias"].shape == (48,)


def test_synthetic_is_deterministic_per_seed(tmp_path: Path) -> None:
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        write_synthetic_gguf(tmp_path / f"{name}.gguf", seed=seed)
    a, b, c = ((tmp_path / f"{n}.gguf").read_bytes() for n in "abc")
    assert a == b and a != c


def test_synthetic_vocab_padding_and_k_fallback(tmp_path: Path) -> None:
    path = tmp_path / "p.gguf"
    written = write_synthetic_gguf(path, hidden=64, ffn=256, vocab=1000, weight_type=QType.Q4_K)
    assert written["blk.0.attn_q.weight"] == QType.Q5_0      # 64 columns: not whole Q4_K blocks
    assert written["blk.0.ffn_down.weight"] == QType.Q4_K    # 256 columns
    with load_gguf(path) as model:
        assert model.config.vocab_size == 1000 and model.tensors["token_embd.weight"].shape == (1000, 64)
    with pytest.raises(ValueError):
        write_synthetic_gguf(tmp_path / "q.gguf", vocab=10)


def test_cli_writes_a_loadable_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    main([str(out), "--preset", "tiny", "--type", "Q6_K", "--tied", "--seed", "9"])
    assert "wrote" in capsys.readouterr().out
    with load_gguf(out) as model:
        assert model.config.tied_embeddings and model.config.num_layers == PRESETS["tiny"].num_layers


@pytest.mark.real_model
def test_real_preset_shapes_equal_the_real_model(real_model_path: Path) -> None:
    with load_gguf(real_model_path) as model:
        real = {name: t.shape for name, t in model.tensors.items()}
        c = model.config
    s = PRESETS["real"]
    assert (s.num_layers, s.hidden, s.heads, s.kv_heads, s.ffn, s.context) == (
        c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size, c.context_length)
    assert expected_shapes(c) == real


def test_convert_to_f16_keeps_values_and_metadata(mixed_model: Path, tmp_path: Path) -> None:
    dst = tmp_path / "f16.gguf"
    lines: list[str] = []
    convert_to_f16(mixed_model, dst, progress=lines.append)
    assert len(lines) == 3 + 2 * 12 and not (tmp_path / "f16.gguf.tmp").exists()
    with load_gguf(mixed_model) as src, load_gguf(dst) as out:
        assert out.config == src.config and out.metadata["general.file_type"] == 1
        for key, value in src.metadata.items():
            if key != "general.file_type":
                assert out.metadata[key] == value and out.metadata_types[key] == src.metadata_types[key], key
        for name, tensor in src.tensors.items():
            converted = out.tensors[name]
            expected_type = tensor.qtype if len(tensor.shape) == 1 else QType.F16
            assert converted.qtype == expected_type and converted.shape == tensor.shape
            original = dequantize(tensor)
            np.testing.assert_allclose(dequantize(converted), original, rtol=1e-3,
                                       atol=1e-3 * np.abs(original).max())


def test_convert_real_tokenizer_model(tiny_model_path: Path, tmp_path: Path) -> None:
    dst = convert_to_f16(tiny_model_path, tmp_path / "tiny-f16.gguf")
    with load_gguf(tiny_model_path) as src, load_gguf(dst) as out:
        assert out.metadata["tokenizer.ggml.tokens"] == src.metadata["tokenizer.ggml.tokens"]
        assert out.metadata["tokenizer.chat_template"] == src.metadata["tokenizer.chat_template"]
        assert out.config == src.config


def test_memory_estimate_counts_stored_bytes(mixed_model: Path, tmp_path: Path) -> None:
    dst = convert_to_f16(mixed_model, tmp_path / "f16.gguf")
    for path in (mixed_model, dst):
        with load_gguf(path) as model:
            estimate = estimate_memory(model.config, tensor_types_of(model), context_tokens=100)
            assert estimate.weight_bytes == sum(t.nbytes for t in model.tensors.values())
            assert estimate.kv_bytes == 100 * model.config.kv_bytes_per_token
            assert estimate.total_bytes == estimate.weight_bytes + estimate.kv_bytes
    with load_gguf(dst) as model:
        f16_elems = sum(int(np.prod(t.shape)) for t in model.tensors.values() if t.qtype == QType.F16)
        f32_elems = sum(int(np.prod(t.shape)) for t in model.tensors.values() if t.qtype == QType.F32)
        assert estimate_memory(model.config, tensor_types_of(model), 0).weight_bytes == 2 * f16_elems + 4 * f32_elems
    with pytest.raises(ValueError):
        estimate_memory(model.config, {}, -1)


@pytest.mark.real_model
def test_memory_estimate_real_model(real_model_path: Path) -> None:
    with load_gguf(real_model_path) as model:
        estimate = estimate_memory(model.config, tensor_types_of(model), context_tokens=32768)
        assert estimate.kv_bytes == 32768 * 12 * 1024               # 12 KiB per token
        assert estimate.weight_bytes == model.file_size - model.data_offset == 485_452_288
