"""numpy backend over the paged KV cache, built on gpu_worker.model.qwen2_reference."""
from gpu_worker.backends.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
