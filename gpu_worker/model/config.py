"""Model configuration, read only from GGUF metadata (never hard-coded)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a qwen2-architecture model.

    Every field comes from the file's `qwen2.*` metadata (see `gguf_loader`). Qwen2.5-0.5B:
    24 layers, hidden 896, 14 q heads, 2 kv heads, head_dim 64, ffn 4864, vocab 151936,
    context 32768, rms eps 1e-6, rope base 1e6 (NeoX rotation).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    context_length: int
    rms_norm_eps: float
    rope_freq_base: float
    eos_token_id: int
    bos_token_id: int | None = None
    tied_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                     "intermediate_size", "vocab_size", "context_length"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} not divisible by num_kv_heads {self.num_kv_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("head_dim must be even for RoPE")
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not (self.rope_freq_base > 0):
            raise ValueError(f"rope_freq_base must be > 0, got {self.rope_freq_base}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """fp16 K and V for every layer: 24 * 2 * 2 * 64 * 2 B = 12 KiB for Qwen2.5-0.5B."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * 2
