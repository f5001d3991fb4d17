"""load_gguf: config from metadata, tensors, agreement with gguf.GGUFReader, and every typed error."""
from __future__ import annotations

import shutil
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from gpu_worker.model import errors as E
from gpu_worker.model.dequant import dequantize
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.synthetic import write_synthetic_gguf
from tests.gguf_layout import header_layout


def _compare_with_gguf_reader(path: Path, keys: list[str] | None = None) -> None:
    """Our parse equals gguf's own reader: metadata values, tensor types, shapes and bytes."""
    reader = gguf.GGUFReader(path)
    with load_gguf(path) as model:
        assert model.data_offset == reader.data_offset
        for key in keys if keys is not None else model.metadata:
            assert model.metadata[key] == reader.fields[key].contents(), key
        assert set(model.tensors) == {t.name for t in reader.tensors}
        for ref in reader.tensors:
            ours = model.tensors[ref.name]
            assert ours.qtype == ref.tensor_type
            assert ours.shape == tuple(reversed(ref.shape.tolist()))
            assert ours.nbytes == ref.n_bytes
            np.testing.assert_array_equal(ours.data, ref.data.reshape(-1).view(np.uint8))


def test_tiny_model_config_and_tensors(tiny_model_path: Path) -> None:
    with load_gguf(tiny_model_path) as model:
        c = model.config
        assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("qwen2", 2, 64, 4, 2)
        assert (c.intermediate_size, c.context_length, c.rope_freq_base) == (128, 2048, 1e6)
        assert c.rms_norm_eps == pytest.approx(1e-6) and not c.tied_embeddings
        assert c.vocab_size == len(model.metadata["tokenizer.ggml.tokens"])
        assert model.tensors["blk.1.attn_k.bias"].shape == (32,)
        assert model.tensors["blk.0.ffn_down.weight"].shape == (64, 128)
        assert model.tensors["blk.0.ffn_down.weight"].qtype == QType.Q8_0
        assert model.lm_head is model.tensors["output.weight"]
        assert isinstance(model.metadata["tokenizer.chat_template"], str)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_model_path but always with the 269-token byte-level vocabulary: fast to parse
    (for the many corruption tests) and to read with GGUFReader."""
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    write_synthetic_gguf(path, seed=1)
    return path


def test_small_model_matches_gguf_reader(small_model: Path) -> None:
    _compare_with_gguf_reader(small_model)


def test_tied_embeddings_fall_back_to_token_embd(tmp_path: Path) -> None:
    path = tmp_path / "tied.gguf"
    write_synthetic_gguf(path, tied=True)
    with load_gguf(path) as model:
        assert model.config.tied_embeddings and "output.weight" not in model.tensors
        assert model.lm_head is model.tensors["token_embd.weight"]


def test_missing_rope_base_uses_gguf_default(tmp_path: Path) -> None:
    path = tmp_path / "norope.gguf"
    write_synthetic_gguf(path)
    _rename_key(path, "qwen2.rope.freq_base", "qwen2.rope.freq_bas_")
    with load_gguf(path) as model:
        assert model.config.rope_freq_base == 10000.0


@pytest.mark.real_model
def test_real_model_config(real_model_path: Path) -> None:
    with load_gguf(real_model_path) as model:
        c = model.config
        assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (24, 896, 14, 2, 64)
        assert (c.intermediate_size, c.vocab_size, c.context_length) == (4864, 151936, 32768)
        assert c.rope_freq_base == 1e6 and c.rms_norm_eps == pytest.approx(1e-6)
        assert (c.eos_token_id, c.bos_token_id, c.tied_embeddings) == (151645, None, False)
        assert model.tensors["output.weight"].qtype == QType.Q8_0
        assert model.tensors["blk.0.attn_q.bias"].shape == (896,)
        assert model.metadata["tokenizer.ggml.tokens"][151645] == "<|im_end|>"
        assert len(model.metadata["tokenizer.ggml.merges"]) == 151387
        assert dequantize(model.tensors["output_norm.weight"]).shape == (896,)


@pytest.mark.real_model
def test_real_model_matches_gguf_reader(real_model_path: Path) -> None:
    _compare_with_gguf_reader(real_model_path, keys=["general.architecture", "qwen2.rope.freq_base",
                                                     "tokenizer.ggml.eos_token_id", "tokenizer.chat_template",
                                                     "tokenizer.ggml.token_type"])


# ---- typed errors, one per kind, each from a concrete corruption of a valid file ----

def _copy_tiny(tiny: Path, tmp_path: Path) -> tuple[Path, bytearray]:
    path = tmp_path / "bad.gguf"
    shutil.copy(tiny, path)
    return path, bytearray(path.read_bytes())


def _rename_key(path: Path, old: str, new: str) -> None:
    data = path.read_bytes()
    at = header_layout(data).kvs[old].key_len_at + 8
    path.write_bytes(data[:at] + new.encode() + data[at + len(old):])


def _expect(path: Path, error: type[E.GGUFLoadError], field_part: str) -> E.GGUFLoadError:
    with pytest.raises(error) as info:
        load_gguf(path)
    assert field_part in info.value.field and str(path) in str(info.value)
    return info.value


def _patch(path: Path, data: bytearray, at: int, fmt: str, value) -> None:
    struct.pack_into(fmt, data, at, value)
    path.write_bytes(bytes(data))


def test_bad_magic(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    data[0:4] = b"GGML"
    path.write_bytes(bytes(data))
    _expect(path, E.BadMagic, "magic")


@pytest.mark.parametrize("version", [1, 4, 0x03000000])
def test_unsupported_version(small_model: Path, tmp_path: Path, version: int) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    _patch(path, data, 4, "<I", version)
    _expect(path, E.UnsupportedVersion, "version")


@pytest.mark.parametrize("cut", [0, 10, 23, 200, 5000])
def test_truncated_header(small_model: Path, tmp_path: Path, cut: int) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    path.write_bytes(bytes(data[:cut]))
    with pytest.raises(E.Truncated):
        load_gguf(path)


def test_truncated_tensor_data(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    path.write_bytes(bytes(data[:-1000]))
    _expect(path, E.TensorOutOfBounds, "")


def test_huge_counts_and_lengths_overflow(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    layout = header_layout(bytes(data))
    for at, field_part in [(16, "kv_count"), (8, "tensor_count"),
                           (layout.kvs["general.name"].value_at, "general.name"),
                           (layout.kvs["tokenizer.ggml.tokens"].array_len_at, "tokenizer.ggml.tokens")]:
        original = bytes(data)
        _patch(path, data, at, "<Q", 2**63 + 5)
        _expect(path, E.SizeOverflow, field_part)
        data[:] = original


def test_tensor_dims_overflow(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    t = header_layout(bytes(data)).tensors["blk.0.ffn_up.weight"]
    _patch(path, data, t.dims_at + 8, "<Q", 2**62)
    _expect(path, E.SizeOverflow, "blk.0.ffn_up.weight")


@pytest.mark.parametrize("offset_delta,why", [(1, "misaligned"), (2**40, "beyond")])
def test_tensor_out_of_bounds(small_model: Path, tmp_path: Path, offset_delta: int, why: str) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    t = header_layout(bytes(data)).tensors["output_norm.weight"]
    (offset,) = struct.unpack_from("<Q", data, t.offset_at)
    _patch(path, data, t.offset_at, "<Q", offset + offset_delta)
    _expect(path, E.TensorOutOfBounds, "output_norm.weight")


def test_unknown_architecture(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    at = header_layout(bytes(data)).kvs["general.architecture"].value_at + 8
    data[at:at + 5] = b"llama"
    path.write_bytes(bytes(data))
    error = _expect(path, E.UnknownArchitecture, "general.architecture")
    assert "llama" in str(error)


@pytest.mark.parametrize("key", ["qwen2.block_count", "qwen2.attention.head_count_kv",
                                 "qwen2.attention.layer_norm_rms_epsilon", "tokenizer.ggml.eos_token_id"])
def test_missing_key(small_model: Path, tmp_path: Path, key: str) -> None:
    path, _ = _copy_tiny(small_model, tmp_path)
    _rename_key(path, key, key[:-1] + "#")
    _expect(path, E.MissingKey, key)


@pytest.mark.parametrize("name", ["blk.1.attn_q.bias", "output_norm.weight", "blk.0.ffn_down.weight"])
def test_missing_tensor(small_model: Path, tmp_path: Path, name: str) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    at = header_layout(bytes(data)).tensors[name].name_len_at + 8
    data[at] = ord("X")
    path.write_bytes(bytes(data))
    _expect(path, E.MissingTensor, name)


def test_shape_mismatch_with_config(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    t = header_layout(bytes(data)).tensors["blk.0.attn_k.weight"]   # GGUF dims (64, 32) -> (32, 64)
    _patch(path, data, t.dims_at + 8, "<Q", 16)                      # fewer rows: still in bounds
    error = _expect(path, E.ShapeMismatch, "blk.0.attn_k.weight")
    assert "(16, 64)" in str(error) and "(32, 64)" in str(error)


def test_shape_mismatch_from_metadata(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    _patch(path, data, header_layout(bytes(data)).kvs["qwen2.feed_forward_length"].value_at, "<I", 96)
    _expect(path, E.ShapeMismatch, "blk.0.ffn_gate.weight")


@pytest.mark.parametrize("raw_type", [int(QType.Q2_K), int(QType.IQ4_NL), 99])
def test_unsupported_tensor_type(small_model: Path, tmp_path: Path, raw_type: int) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    t = header_layout(bytes(data)).tensors["blk.0.ffn_up.weight"]
    _patch(path, data, t.type_at, "<I", raw_type)
    _expect(path, E.UnsupportedTensorType, "blk.0.ffn_up.weight")


def test_invalid_values(small_model: Path, tmp_path: Path) -> None:
    path, data = _copy_tiny(small_model, tmp_path)
    layout = header_layout(bytes(data))
    original = bytes(data)
    _patch(path, data, layout.kvs["qwen2.attention.head_count"].value_at, "<I", 3)   # 64 % 3 != 0
    _expect(path, E.InvalidValue, "qwen2")
    data[:] = original
    _patch(path, data, layout.kvs["qwen2.block_count"].type_at, "<I", 8)             # now a string
    with pytest.raises(E.GGUFLoadError):
        load_gguf(path)
    data[:] = original
    _patch(path, data, layout.kvs["general.name"].type_at, "<I", 77)                 # no such type
    _expect(path, E.InvalidValue, "general.name")


def test_missing_file_is_typed(tmp_path: Path) -> None:
    _expect(tmp_path / "nope.gguf", E.FileUnreadable, "file")


def test_error_pickles_and_names_file_and_field(tmp_path: Path) -> None:
    import pickle

    error = E.ShapeMismatch(tmp_path / "m.gguf", "blk.0.attn_q.weight", "bad")
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is E.ShapeMismatch and str(copy) == str(error) == f"{tmp_path}/m.gguf: blk.0.attn_q.weight: bad"


def test_duplicates_bad_utf8_and_bad_alignment(small_model: Path, tmp_path: Path) -> None:
    path, _ = _copy_tiny(small_model, tmp_path)
    _rename_key(path, "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
    _expect(path, E.InvalidValue, "tokenizer.ggml.eos_token_id")

    path, data = _copy_tiny(small_model, tmp_path)
    at = header_layout(bytes(data)).tensors["blk.0.attn_q.bias"].name_len_at + 8
    data[at:at + len("blk.0.attn_k.bias")] = b"blk.0.attn_k.bias"
    path.write_bytes(bytes(data))
    _expect(path, E.InvalidValue, "blk.0.attn_k.bias")

    path, data = _copy_tiny(small_model, tmp_path)
    at = header_layout(bytes(data)).kvs["general.name"].value_at + 8
    data[at] = 0xFF                                                  # never valid in UTF-8
    path.write_bytes(bytes(data))
    _expect(path, E.InvalidValue, "general.name")

    path, data = _copy_tiny(small_model, tmp_path)
    kv = header_layout(bytes(data)).kvs["qwen2.block_count"]          # uint32 value, 17-char key
    data[kv.key_len_at + 8:kv.key_len_at + 8 + 17] = b"general.alignment"
    struct.pack_into("<I", data, kv.value_at, 3)
    path.write_bytes(bytes(data))
    error = _expect(path, E.InvalidValue, "general.alignment")
    assert "power of two" in str(error)
