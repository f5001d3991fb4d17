"""Front-end configuration: one frozen dataclass, filled from CLI flags or QWEN_SERVE_* env vars."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Everything `qwen-serve serve` needs. Defaults are safe: loopback only, no auth, no TLS."""

    host: str = "127.0.0.1"
    port: int = 50051
    model_path: str | None = None          # None = the fetched default model
    backend: str = "auto"                  # auto | cpu | cuda
    attach_dir: str | None = None          # socket dir of a running worker; None = spawn our own
    max_queue: int = 64                    # requests admitted but not yet finished, beyond the batch
    kv_cache_gb: float | None = None       # None = the worker's own default
    max_batch: int = 32
    max_tokens_per_step: int | None = None  # None = the worker's default for its backend
    prefix_cache: bool = True              # the spawned worker reuses KV of repeated prompt prefixes
    grace_period_s: float = 30.0
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    auth_exempt_health: bool = True
    metrics_port: int | None = None
    log_json: bool = False
    log_requests: bool = False             # log prompt/output text (debug only)
    max_message_bytes: int = 16 * 1024 * 1024
    # Token messages per second the front-end aims at over all streams; 0 = every token at once
    # (server.worker_client._Pacing says why and how).
    stream_messages_per_s: float = 8000.0

    def __post_init__(self) -> None:
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.backend not in ("auto", "cpu", "cuda"):
            raise ValueError(f"backend must be auto, cpu or cuda, got {self.backend!r}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_tokens_per_step is not None and self.max_tokens_per_step < self.max_batch:
            raise ValueError(f"max_tokens_per_step must be >= max_batch ({self.max_batch}), "
                             f"got {self.max_tokens_per_step}")
        if self.kv_cache_gb is not None and not (self.kv_cache_gb > 0 and math.isfinite(self.kv_cache_gb)):
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if not (self.grace_period_s >= 0 and math.isfinite(self.grace_period_s)):
            raise ValueError(f"grace_period must be >= 0 seconds, got {self.grace_period_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.auth_token is not None and not self.auth_token:
            raise ValueError("auth_token must not be empty when given")
        if self.metrics_port is not None and not (0 <= self.metrics_port <= 65535):
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if not (self.stream_messages_per_s >= 0 and math.isfinite(self.stream_messages_per_s)):
            raise ValueError(f"stream_messages_per_s must be >= 0, got {self.stream_messages_per_s}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{host}:{self.port}"

    @property
    def uses_tls(self) -> bool:
        return self.tls_cert is not None
