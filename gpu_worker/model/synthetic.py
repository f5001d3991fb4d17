"""Synthetic qwen2 GGUF files for tests and GPU benchmarks: tiny or real shapes, any supported type.

Blocks are *valid*: random quant bytes with fp16 scale fields set so that weights come out roughly
N(0, 0.02) (never NaN/inf). Metadata follows the real layout (`qwen2.*` keys, tokenizer keys copied
from a real file, or a small byte-level vocabulary).

    python -m gpu_worker.model.synthetic OUT.gguf --preset real --type Q4_K
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
from gguf import GGMLQuantizationType as QType
from gguf import GGUFValueType as VType

from gpu_worker.model.convert import write_gguf
from gpu_worker.model.gguf_config import expected_shapes
from gpu_worker.model.config import ModelConfig
from gpu_worker.model.quant_types import SUPPORTED_TYPES, quant_spec

WEIGHT_STD = 0.02
REAL_VOCAB = 151936


@dataclass(frozen=True)
class SyntheticShape:
    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    context: int

    def __post_init__(self) -> None:
        if min(self.num_layers, self.hidden, self.heads, self.kv_heads, self.ffn, self.context) <= 0:
            raise ValueError(f"all sizes must be > 0: {self}")


PRESETS = {
    "tiny": SyntheticShape(num_layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, context=2048),
    "real": SyntheticShape(num_layers=24, hidden=896, heads=14, kv_heads=2, ffn=4864, context=32768),
}

# Per type: byte offsets of fp16 fields, and the scale that maps random quant bytes to ~N(0, std):
# (d offset, d divisor, min offset or None, min as a multiple of d).
_SCALE_FIELDS: dict[QType, tuple[int, float, int | None, float]] = {
    QType.Q8_0: (0, 73.9, None, 0.0),
    QType.Q4_0: (0, 4.6, None, 0.0),
    QType.Q4_1: (0, 4.6, 2, -7.5),
    QType.Q5_0: (0, 9.2, None, 0.0),
    QType.Q5_1: (0, 9.2, 2, -15.5),
    QType.Q4_K: (0, 31.5 * 4.6 * 1.8, 2, 7.5),  # y = d*sc*q - dmin*m; sc, m random 6-bit: the

        # per-sub-block offsets add variance, hence the extra 1.8
    QType.Q5_K: (0, 31.5 * 9.2 * 1.8, 2, 15.5),
    QType.Q6_K: (208, 74.0 * 18.5, None, 0.0),  # y = d*sc*(q-32), sc random int8
}


def random_blocks(qtype: QType, num_blocks: int, rng: np.random.Generator,
                  std: float = WEIGHT_STD) -> np.ndarray:
    """Valid random blocks of `qtype` # [num_blocks, block_bytes] uint8, values ~N(0, std)-ish."""
    spec = quant_spec(qtype)
    if qtype in (QType.F32, QType.F16, QType.BF16):
        values = rng.normal(0.0, std, num_blocks).astype(np.float32)
        if qtype == QType.F16:
            values = values.astype(np.float16)
        elif qtype == QType.BF16:
            values = (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.view(np.uint8).reshape(num_blocks, spec.block_bytes)
    blocks = rng.integers(0, 256, (num_blocks, spec.block_bytes), dtype=np.uint8)
    d_at, divisor, m_at, m_mult = _SCALE_FIELDS[qtype]
    d = (std / divisor * rng.uniform(0.5, 1.5, num_blocks)).astype(np.float16)
    blocks[:, d_at:d_at + 2] = d.reshape(-1, 1).view(np.uint8)
    if m_at is not None:
        blocks[:, m_at:m_at + 2] = (d.astype(np.float32) * m_mult).astype(np.float16).reshape(-1, 1).view(np.uint8)
    return blocks


# llama.cpp's fallbacks for rows that are not whole 256-element super-blocks (896 columns here).
_K_FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q5_K: QType.Q5_1, QType.Q6_K: QType.Q8_0}


def _tensor_type(name: str, shape: tuple[int, ...], weight_type: QType | Mapping[str, QType]) -> QType:
    """The requested type (F32 for 1-D tensors unless a mapping names them), falling back like
    llama.cpp's quantizer (K-quant -> legacy quant -> F16 -> F32) when rows are not whole blocks."""
    if isinstance(weight_type, Mapping):
        wanted = weight_type.get(name, QType.F32 if len(shape) == 1 else QType.Q8_0)
    else:
        wanted = QType.F32 if len(shape) == 1 else weight_type
    if wanted not in SUPPORTED_TYPES:
        raise ValueError(f"{name}: unsupported type {wanted!r}")
    for candidate in (wanted, _K_FALLBACK.get(QType(wanted), QType.Q8_0), QType.F16):
        if shape[-1] % quant_spec(candidate).block_elems == 0:
            return QType(candidate)
    return QType.F32


def _tensor_bytes(name: str, shape: tuple[int, ...], qtype: QType, rng: np.random.Generator) -> np.ndarray:
    """Raw bytes # [rows, row_bytes] (or [row_bytes] for 1-D); norms ~1, everything else ~N(0, std)."""
    if name.endswith("norm.weight"):
        raw = _encode_float((1.0 + rng.normal(0.0, 0.05, shape)).astype(np.float32), qtype)
    else:
        num_elems = int(np.prod(shape))
        raw = random_blocks(qtype, num_elems // quant_spec(qtype).block_elems, rng)
    return raw.reshape(shape[0], -1) if len(shape) == 2 else raw.reshape(-1)


def _encode_float(values: np.ndarray, qtype: QType) -> np.ndarray:
    if qtype == QType.F32:
        return values.astype(np.float32).view(np.uint8)
    if qtype == QType.F16:
        return values.astype(np.float16).view(np.uint8)
    if qtype == QType.BF16:
        return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    raise ValueError(f"norm weights must be a float type, got {qtype.name}")


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MERGES = ("Ġ t", "h e", "i n", "e r", "a n", "o n", "Ġ a", "r e", "Ġt he", "Ġ s")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _byte_to_unicode() -> list[str]:
    """GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 onwards."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_level_vocab() -> list[tuple[str, object, VType, VType | None]]:
    """A small gpt2-style vocabulary: 256 bytes, a few merges, ChatML specials (eos = <|im_end|>)."""
    tokens = _byte_to_unicode() + [m.replace(" ", "") for m in _MERGES] + list(SPECIAL_TOKENS)
    token_types = [1] * (len(tokens) - len(SPECIAL_TOKENS)) + [3] * len(SPECIAL_TOKENS)   # 3 = control
    first_special = len(tokens) - len(SPECIAL_TOKENS)
    return [
        ("tokenizer.ggml.model", "gpt2", VType.STRING, None),
        ("tokenizer.ggml.pre", "qwen2", VType.STRING, None),
        ("tokenizer.ggml.tokens", tokens, VType.ARRAY, VType.STRING),
        ("tokenizer.ggml.token_type", token_types, VType.ARRAY, VType.INT32),
        ("tokenizer.ggml.merges", list(_MERGES), VType.ARRAY, VType.STRING),
        ("tokenizer.ggml.eos_token_id", first_special + 2, VType.UINT32, None),
        ("tokenizer.ggml.padding_token_id", first_special, VType.UINT32, None),
        ("tokenizer.ggml.bos_token_id", first_special, VType.UINT32, None),
        ("tokenizer.ggml.add_bos_token", False, VType.BOOL, None),
        ("tokenizer.chat_template", CHATML_TEMPLATE, VType.STRING, None),
    ]


def _padded_vocab(tokenizer: list[tuple[str, object, VType, VType | None]],
                  vocab: int) -> list[tuple[str, object, VType, VType | None]]:
    """Extend the token list to `vocab` entries with unused filler tokens (type 5 = unused)."""
    items = {key: (value, vtype, item) for key, value, vtype, item in tokenizer}
    tokens = list(items["tokenizer.ggml.tokens"][0])
    if vocab < len(tokens):
        raise ValueError(f"vocab {vocab} is smaller than the tokenizer's {len(tokens)} tokens")
    token_types = list(items["tokenizer.ggml.token_type"][0])
    extra = vocab - len(tokens)
    tokens += [f"<|filler_{i}|>" for i in range(extra)]
    token_types += [5] * extra
    padded = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": token_types}
    return [(key, padded.get(key, value), vtype, item) for key, value, vtype, item in tokenizer]


def _tokenizer_keys(tokenizer_from: str | Path | None) -> list[tuple[str, object, VType, VType | None]]:
    """(key, value, type, array item type) for every tokenizer.* key to write."""
    if tokenizer_from is None:
        return byte_level_vocab()
    from gpu_worker.model.gguf_loader import load_gguf

    with load_gguf(tokenizer_from) as source:
        return [(key, value, VType(source.metadata_types[key][0]),
                 None if source.metadata_types[key][1] is None else VType(source.metadata_types[key][1]))
                for key, value in source.metadata.items() if key.startswith("tokenizer.")]


def write_synthetic_gguf(path: str | Path, *, num_layers: int = 2, hidden: int = 64, heads: int = 4,
                         kv_heads: int = 2, ffn: int = 128, vocab: int | None = None, context: int = 2048,
                         weight_type: QType | Mapping[str, QType] = QType.Q8_0, seed: int = 0,
                         tokenizer_from: str | Path | None = None, tied: bool = False,
                         real_shapes: bool = False, rope_freq_base: float = 1e6,
                         rms_eps: float = 1e-6) -> dict[str, QType]:
    """Write a valid random qwen2 GGUF to `path`; returns the type written for each tensor.

    `real_shapes=True` uses the Qwen2.5-0.5B dimensions (24 x 896, 14/2 heads, ffn 4864, ctx 32768).
    `vocab` defaults to the token list's length (151936 with `tokenizer_from` the real model; also
    151936 with `real_shapes`); a larger `vocab` pads the token list with unused filler tokens.
    """
    shape = PRESETS["real"] if real_shapes else SyntheticShape(num_layers, hidden, heads, kv_heads, ffn, context)
    tokenizer = _tokenizer_keys(tokenizer_from)
    tokens = next(value for key, value, *_ in tokenizer if key == "tokenizer.ggml.tokens")
    if real_shapes and vocab is None:
        vocab = REAL_VOCAB
    if vocab is not None and vocab != len(tokens):
        tokenizer = _padded_vocab(tokenizer, vocab)
        tokens = next(value for key, value, *_ in tokenizer if key == "tokenizer.ggml.tokens")
    config = ModelConfig("qwen2", shape.num_layers, shape.hidden, shape.heads, shape.kv_heads, shape.ffn,
                         len(tokens), shape.context, rms_eps, rope_freq_base, eos_token_id=0,
                         tied_embeddings=tied)
    plan = [(name, _tensor_type(name, tensor_shape, weight_type), tensor_shape)
            for name, tensor_shape in expected_shapes(config).items()]
    rng = np.random.default_rng(seed)
    by_name = {name: (qtype, tensor_shape) for name, qtype, tensor_shape in plan}
    write_gguf(path, "qwen2", _model_keys(config) + tokenizer, plan,
               lambda name: _tensor_bytes(name, by_name[name][1], by_name[name][0], rng))
    return {name: qtype for name, qtype, _ in plan}


def _model_keys(config: ModelConfig) -> list[tuple[str, object, VType, VType | None]]:
    arch = config.architecture
    return [
        ("general.name", "synthetic qwen2", VType.STRING, None),
        (f"{arch}.block_count", config.num_layers, VType.UINT32, None),
        (f"{arch}.context_length", config.context_length, VType.UINT32, None),
        (f"{arch}.embedding_length", config.hidden_size, VType.UINT32, None),
        (f"{arch}.feed_forward_length", config.intermediate_size, VType.UINT32, None),
        (f"{arch}.attention.head_count", config.num_heads, VType.UINT32, None),
        (f"{arch}.attention.head_count_kv", config.num_kv_heads, VType.UINT32, None),
        (f"{arch}.rope.freq_base", config.rope_freq_base, VType.FLOAT32, None),
        (f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps, VType.FLOAT32, None),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic qwen2 GGUF with valid random weights.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--type", default="Q8_0", choices=[t.name for t in SUPPORTED_TYPES],
                        help="type of the 2-D weights (norms and biases stay F32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-from", type=Path, default=None,
                        help="copy tokenizer.* metadata from this GGUF (vocab then matches it)")
    parser.add_argument("--tied", action="store_true", help="omit output.weight (tied embeddings)")
    parser.add_argument("--vocab", type=int, default=None,
                        help="pad the vocabulary to this size (default: 151936 for --preset real)")
    args = parser.parse_args(argv)
    s = PRESETS[args.preset]
    written = write_synthetic_gguf(args.out, num_layers=s.num_layers, hidden=s.hidden, heads=s.heads,
                                   kv_heads=s.kv_heads, ffn=s.ffn, context=s.context,
                                   weight_type=QType[args.type], seed=args.seed,
                                   tokenizer_from=args.tokenizer_from, tied=args.tied,
                                   vocab=args.vocab if args.vocab or args.preset != "real" else REAL_VOCAB)
    counts: dict[str, int] = {}
    for qtype in written.values():
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes): {len(written)} tensors {counts}")


if __name__ == "__main__":
    main()
