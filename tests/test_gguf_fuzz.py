"""GGUF fuzzing (issue 7, "Bad files"): mutated headers, counts, string/array lengths, tensor
offsets/shapes/types of a small valid file. Every case must end in a `GGUFLoadError` (or load a
model whose every tensor dequantizes) -- never another exception, a hang, or memory beyond a
small multiple of the file size. Found cases are kept in tests/corpus/gguf/ and replayed.

Set QWEN_SERVE_GGUF_FUZZ_EXAMPLES=N for a longer run, QWEN_SERVE_GGUF_CORPUS_ADD=1 to save one new example per (error class, field kind) into the corpus.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_worker.model.convert import write_gguf
from gpu_worker.model.dequant import dequantize
from gpu_worker.model.errors import GGUFLoadError
from gpu_worker.model.gguf_config import expected_shapes
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.quant_types import quant_spec
from gpu_worker.model.synthetic import random_blocks
from tests.gguf_layout import header_layout

CORPUS_DIR = Path(__file__).parent / "corpus" / "gguf"
MANIFEST = CORPUS_DIR / "MANIFEST.json"
EXPLORE = "QWEN_SERVE_GGUF_FUZZ_EXAMPLES" in os.environ
MAX_EXAMPLES = int(os.environ.get("QWEN_SERVE_GGUF_FUZZ_EXAMPLES", "300"))   # raise for longer runs
# Python objects for metadata lists (ints, strs) cost a few times the bytes they are read from.
MEMORY_FACTOR, MEMORY_SLACK = 12, 4 << 20

_TYPES = {"blk.0.attn_q.weight": QType.Q8_0, "blk.0.attn_k.weight": QType.Q4_0, "blk.0.attn_v.weight": QType.Q5_1,
          "blk.0.attn_output.weight": QType.Q5_0, "blk.0.ffn_gate.weight": QType.Q4_0,
          "blk.0.ffn_up.weight": QType.Q8_0, "blk.0.ffn_down.weight": QType.BF16,
          "token_embd.weight": QType.F16, "output.weight": QType.Q4_1}
MAX_CORPUS_PER_OUTCOME = 3


def _write_base(path: Path) -> None:
    """1 layer, hidden 32, 2/1 heads, ffn 64, 16-token vocab, 7 tensor types, every GGUF value kind."""
    config = ModelConfig("qwen2", 1, 32, 2, 1, 64, 16, 128, 1e-6, 1e6, eos_token_id=15)
    tokens = [chr(ord("a") + i) for i in range(13)] + ["ab", "<|endoftext|>", "<|im_end|>"]
    metadata = [
        ("general.alignment", 32, VType.UINT32, None),
        ("general.name", "fuzz base", VType.STRING, None),
        ("qwen2.block_count", 1, VType.UINT32, None), ("qwen2.context_length", 128, VType.UINT64, None),
        ("qwen2.embedding_length", 32, VType.UINT32, None), ("qwen2.feed_forward_length", 64, VType.INT32, None),
        ("qwen2.attention.head_count", 2, VType.UINT16, None), ("qwen2.attention.head_count_kv", 1, VType.UINT8, None),
        ("qwen2.rope.freq_base", 1e6, VType.FLOAT64, None),
        ("qwen2.attention.layer_norm_rms_epsilon", 1e-6, VType.FLOAT32, None),
        ("tokenizer.ggml.model", "gpt2", VType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VType.ARRAY, VType.STRING),
        ("tokenizer.ggml.token_type", [1] * 14 + [3, 3], VType.ARRAY, VType.INT32),
        ("tokenizer.ggml.merges", ["a b"], VType.ARRAY, VType.STRING),
        ("tokenizer.ggml.eos_token_id", 15, VType.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, VType.BOOL, None),
        ("test.nested", [[1, 2], [3]], VType.ARRAY, VType.ARRAY),
        ("test.scores", [0.5, -1.0], VType.ARRAY, VType.FLOAT32),
    ]
    plan = [(name, _TYPES.get(name, QType.F32), shape) for name, shape in expected_shapes(config).items()]
    rng = np.random.default_rng(0)
    blocks = {name: random_blocks(qtype, int(np.prod(shape)) // quant_spec(qtype).block_elems, rng)
              for name, qtype, shape in plan}
    write_gguf(path, "qwen2", metadata, plan, lambda name: blocks[name])


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "base.gguf"
    _write_base(path)
    with load_gguf(path) as model:          # the unmutated base is valid
        assert model.config.vocab_size == 16
    return path.read_bytes()


def _int_fields(base: bytes) -> list[tuple[str, int, str]]:
    """(kind, position, struct format) of every integer field of the header."""
    layout = header_layout(base)
    fields = [("version", 4, "<I"), ("tensor_count", 8, "<Q"), ("kv_count", 16, "<Q")]
    for kv in layout.kvs.values():
        fields += [("key_length", kv.key_len_at, "<Q"), ("value_type", kv.type_at, "<I")]
        (vtype,) = struct.unpack_from("<I", base, kv.type_at)
        if vtype == VType.STRING:
            fields.append(("string_length", kv.value_at, "<Q"))
        elif vtype == VType.ARRAY:
            fields += [("array_item_type", kv.value_at, "<I"), ("array_length", kv.array_len_at, "<Q")]
        else:
            fields.append(("scalar_value", kv.value_at, "<Q" if vtype in (10, 11, 12) else "<I"))
    for t in layout.tensors.values():
        (n_dims,) = struct.unpack_from("<I", base, t.n_dims_at)
        fields += [("tensor_name_length", t.name_len_at, "<Q"), ("tensor_n_dims", t.n_dims_at, "<I"),
                   ("tensor_type", t.type_at, "<I"), ("tensor_offset", t.offset_at, "<Q")]
        fields += [("tensor_dim", t.dims_at + 8 * d, "<Q") for d in range(n_dims)]
    return [(kind, pos, fmt) for kind, pos, fmt in fields if pos + struct.calcsize(fmt) <= len(base)]


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 16, 30, 31, 32, 33, 64, 255, 256, 4095, 65535, 2**31 - 1,
               2**31, 2**32 - 1, 2**32, 2**40, 2**48, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


@st.composite
def mutations(draw: st.DrawFn, base: bytes) -> tuple[bytes, str]:
    """A mutated copy of `base` and a short description of what was done."""
    data, done = bytearray(base), []
    fields = _int_fields(base)
    header_end = header_layout(base).end_of_header
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "field", "field", "flip", "truncate", "insert", "delete"]))
        if kind == "field":
            name, pos, fmt = draw(st.sampled_from(fields))
            (old,) = struct.unpack_from(fmt, data, pos) if pos + struct.calcsize(fmt) <= len(data) else (0,)
            bits = 8 * struct.calcsize(fmt)
            new = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**bits - 1),
                                 st.integers(-40, 40).map(lambda d: old + d)))
            if pos + struct.calcsize(fmt) <= len(data):
                struct.pack_into(fmt, data, pos, new % 2**bits)
            done.append(f"{name}@{pos}={new % 2**bits}")
        elif kind == "flip":
            pos = draw(st.integers(0, min(len(data), header_end) - 1)) if data else 0
            if data:
                data[pos] ^= draw(st.integers(1, 255))
            done.append(f"flip@{pos}")
        elif kind == "truncate":
            cut = draw(st.integers(0, len(data)))
            del data[cut:]
            done.append(f"truncate@{cut}")
        elif kind == "insert":
            pos = draw(st.integers(0, min(len(data), header_end)))
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
            done.append(f"insert@{pos}")
        else:
            pos = draw(st.integers(0, min(len(data), header_end)))
            size = draw(st.integers(1, 64))
            del data[pos:pos + size]
            done.append(f"delete@{pos}+{size}")
    return bytes(data), " ".join(done)


def _load_and_use(path: Path) -> str:
    """Load; on success touch every tensor. Returns the outcome ('ok' or the error class name)."""
    try:
        with load_gguf(path) as model:
            for tensor in model.tensors.values():
                with np.errstate(all="ignore"):
                    dequantize(tensor)
        return "ok"
    except GGUFLoadError as exc:
        return f"{type(exc).__name__}"


def _check_one(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    tracemalloc.start()
    try:
        outcome = _load_and_use(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    limit = MEMORY_FACTOR * len(data) + MEMORY_SLACK
    assert peak <= limit, f"peak {peak} bytes loading a {len(data)}-byte file"
    return outcome


def _maybe_add_to_corpus(data: bytes, outcome: str, how: str, seen: set[str]) -> None:
    kind = re.sub(r"[@=].*", "", how.split()[0])
    key = f"{outcome}-{kind}"
    if os.environ.get("QWEN_SERVE_GGUF_CORPUS_ADD") != "1" or outcome == "ok" or key in seen:
        return
    seen.add(key)
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else {}
    if any(entry["kind"] == key for entry in manifest.values()) or \
            sum(entry["expect"] == outcome for entry in manifest.values()) >= MAX_CORPUS_PER_OUTCOME:
        return
    name = f"{key}-{hashlib.sha256(data).hexdigest()[:10]}.gguf"
    (CORPUS_DIR / name).write_bytes(data)
    manifest[name] = {"kind": key, "expect": outcome, "mutation": how}
    MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


@pytest.mark.timeout(180 + MAX_EXAMPLES // 10)
def test_fuzzed_gguf_files_only_raise_typed_errors(base_file: bytes, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    outcomes: Counter[str] = Counter()
    seen: set[str] = set()
    path = tmp_path / "fuzzed.gguf"

    # Fixed seed in CI (same cases every run); longer exploration runs (env var set) are random.
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=EXPLORE is False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=mutations(base_file))
    def run(case: tuple[bytes, str]) -> None:
        data, how = case
        outcome = _check_one(path, data)
        outcomes[outcome] += 1
        _maybe_add_to_corpus(data, outcome, how, seen)

    run()
    total = sum(outcomes.values())
    with capsys.disabled():
        print(f"\n[gguf fuzz] files fuzzed: {total}; outcomes: {dict(sorted(outcomes.items()))}")
    assert total >= MAX_EXAMPLES // 2
    assert len(outcomes) >= 6         # the mutations reach many different checks


def _corpus_cases() -> list[str]:
    return sorted(json.loads(MANIFEST.read_text())) if MANIFEST.exists() else []


@pytest.mark.parametrize("name", _corpus_cases())
def test_regression_corpus(name: str, tmp_path: Path) -> None:
    entry = json.loads(MANIFEST.read_text())[name]
    data = (CORPUS_DIR / name).read_bytes()
    assert _check_one(tmp_path / name, data) == entry["expect"], entry["mutation"]


def test_regression_corpus_is_present() -> None:
    assert len(_corpus_cases()) >= 10
    assert {p.name for p in CORPUS_DIR.glob("*.gguf")} == set(_corpus_cases())
