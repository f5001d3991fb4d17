"""ModelConfig from GGUF metadata (`qwen2.*` keys only) and tensor-shape checks against it."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from gpu_worker.model import errors as E
from gpu_worker.model.config import ModelConfig

if TYPE_CHECKING:
    from gpu_worker.model.gguf_loader import TensorInfo

SUPPORTED_ARCHITECTURES = ("qwen2",)
# GGUF-spec default for <arch>.rope.freq_base when absent. Qwen2.5 files carry 1e6; this
# fallback exists only for files that omit the key, never as a model constant.
GGUF_DEFAULT_ROPE_FREQ_BASE = 10000.0


def _int_key(path: Path, values: Mapping[str, Any], key: str, required: bool = True) -> int | None:
    if key not in values:
        if required:
            raise E.MissingKey(path, key, "required metadata key is absent")
        return None
    value = values[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise E.InvalidValue(path, key, f"expected a non-negative integer, got {value!r}"[:200])
    return value


def _float_key(path: Path, values: Mapping[str, Any], key: str, default: float | None = None) -> float:
    if key not in values:
        if default is None:
            raise E.MissingKey(path, key, "required metadata key is absent")
        return default
    value = values[key]
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or value == float("inf"):
        raise E.InvalidValue(path, key, f"expected a positive finite number, got {value!r}"[:200])
    return float(value)


def _architecture(path: Path, values: Mapping[str, Any]) -> str:
    arch = values.get("general.architecture")
    if arch is None:
        raise E.MissingKey(path, "general.architecture", "required metadata key is absent")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise E.UnknownArchitecture(path, "general.architecture",
                                    f"{str(arch)[:64]!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _vocab_size(path: Path, values: Mapping[str, Any], tensors: Mapping[str, "TensorInfo"]) -> int:
    """Rows of token_embd.weight; the token list, when present, must have exactly as many entries."""
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise E.MissingTensor(path, "token_embd.weight", "required tensor is absent")
    if len(embd.shape) != 2:
        raise E.ShapeMismatch(path, "token_embd.weight", f"expected 2 dims, got shape {embd.shape}")
    vocab = embd.shape[0]
    tokens = values.get("tokenizer.ggml.tokens")
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) != vocab):
        count = len(tokens) if isinstance(tokens, list) else type(tokens).__name__
        raise E.ShapeMismatch(path, "tokenizer.ggml.tokens", f"{count} tokens but token_embd.weight "
                                                            f"has {vocab} rows")
    return vocab


def config_from_metadata(path: Path, values: Mapping[str, Any],
                         tensors: Mapping[str, "TensorInfo"]) -> ModelConfig:
    """Build the config from `<arch>.*` keys, the tokenizer ids and the embedding's row count."""
    arch = _architecture(path, values)
    vocab = _vocab_size(path, values, tensors)
    eos = _int_key(path, values, "tokenizer.ggml.eos_token_id")
    if eos >= vocab:
        raise E.InvalidValue(path, "tokenizer.ggml.eos_token_id", f"{eos} outside vocabulary of {vocab}")
    # Qwen2.5 files name a bos id but set add_bos_token = false: the model takes no BOS.
    bos = _int_key(path, values, "tokenizer.ggml.bos_token_id", required=False)
    if values.get("tokenizer.ggml.add_bos_token") is not True or (bos is not None and bos >= vocab):
        bos = None
    try:
        return ModelConfig(
            architecture=arch,
            num_layers=_int_key(path, values, f"{arch}.block_count"),
            hidden_size=_int_key(path, values, f"{arch}.embedding_length"),
            num_heads=_int_key(path, values, f"{arch}.attention.head_count"),
            num_kv_heads=_int_key(path, values, f"{arch}.attention.head_count_kv"),
            intermediate_size=_int_key(path, values, f"{arch}.feed_forward_length"),
            vocab_size=vocab,
            context_length=_int_key(path, values, f"{arch}.context_length"),
            rms_norm_eps=_float_key(path, values, f"{arch}.attention.layer_norm_rms_epsilon"),
            rope_freq_base=_float_key(path, values, f"{arch}.rope.freq_base", GGUF_DEFAULT_ROPE_FREQ_BASE),
            eos_token_id=eos,
            bos_token_id=bos,
            tied_embeddings="output.weight" not in tensors,
        )
    except (ValueError, ZeroDivisionError) as exc:
        raise E.InvalidValue(path, f"{arch}.*", str(exc)) from None


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a qwen2 model needs, numpy order (out_features, in_features)."""
    h, kv_dim, ffn = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "token_embd.weight": (config.vocab_size, h),
        "output_norm.weight": (h,),
    }
    if not config.tied_embeddings:
        shapes["output.weight"] = (config.vocab_size, h)
    for i in range(config.num_layers):
        shapes.update({
            f"blk.{i}.attn_norm.weight": (h,),
            f"blk.{i}.attn_q.weight": (config.num_heads * config.head_dim, h),
            f"blk.{i}.attn_q.bias": (config.num_heads * config.head_dim,),
            f"blk.{i}.attn_k.weight": (kv_dim, h),
            f"blk.{i}.attn_k.bias": (kv_dim,),
            f"blk.{i}.attn_v.weight": (kv_dim, h),
            f"blk.{i}.attn_v.bias": (kv_dim,),
            f"blk.{i}.attn_output.weight": (h, config.num_heads * config.head_dim),
            f"blk.{i}.ffn_norm.weight": (h,),
            f"blk.{i}.ffn_gate.weight": (ffn, h),
            f"blk.{i}.ffn_up.weight": (ffn, h),
            f"blk.{i}.ffn_down.weight": (h, ffn),
        })
    return shapes


def check_tensor_shapes(path: Path, config: ModelConfig, tensors: Mapping[str, "TensorInfo"]) -> None:
    """Every required tensor is present with the config's shape (extra tensors are allowed)."""
    if config.num_layers > len(tensors):    # cheap guard before building a huge expectation table
        raise E.MissingTensor(path, f"blk.{len(tensors)}.attn_norm.weight",
                              f"block_count {config.num_layers} exceeds the {len(tensors)} tensors in the file")
    for name, shape in expected_shapes(config).items():
        tensor = tensors.get(name)
        if tensor is None:
            raise E.MissingTensor(path, name, "required tensor is absent")
        if tensor.shape != shape:
            raise E.ShapeMismatch(path, name, f"shape {tensor.shape}, config expects {shape}")

