"""Device memory needed to serve a model: weights as stored plus an fp16 KV cache."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from gguf import GGMLQuantizationType as QType

from gpu_worker.model.config import ModelConfig
from gpu_worker.model.convert import tensor_nbytes

KV_FP16_BYTES = 2


@dataclass(frozen=True)
class MemoryEstimate:
    weight_bytes: int     # every tensor in its stored type
    kv_bytes: int         # K and V, all layers, fp16, for context_tokens tokens
    total_bytes: int

    def __post_init__(self) -> None:
        if min(self.weight_bytes, self.kv_bytes) < 0 or self.total_bytes != self.weight_bytes + self.kv_bytes:
            raise ValueError(f"inconsistent memory estimate {self}")


def estimate_memory(config: ModelConfig, tensor_types: Mapping[str, tuple[QType, tuple[int, ...]]],
                    context_tokens: int) -> MemoryEstimate:
    """`tensor_types` maps tensor name -> (type, numpy shape), e.g. from `tensor_types_of(model)`.

    KV per token = layers * 2 (K, V) * kv_heads * head_dim * 2 B = 12 KiB for Qwen2.5-0.5B.
    """
    if context_tokens < 0:
        raise ValueError(f"context_tokens must be >= 0, got {context_tokens}")
    weight_bytes = sum(tensor_nbytes(QType(qtype), tuple(shape)) for qtype, shape in tensor_types.values())
    kv_bytes = config.num_layers * 2 * config.num_kv_heads * config.head_dim * KV_FP16_BYTES * context_tokens
    return MemoryEstimate(weight_bytes, kv_bytes, weight_bytes + kv_bytes)


def tensor_types_of(model) -> dict[str, tuple[QType, tuple[int, ...]]]:
    """name -> (type, shape) of every tensor of a loaded GGUFModel."""
    return {name: (t.qtype, t.shape) for name, t in model.tensors.items()}
