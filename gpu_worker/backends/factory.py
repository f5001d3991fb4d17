"""Pick and build a backend: "cpu", "cuda", or "auto" (cuda when usable, else cpu).

The cuda package is imported only when asked for, so the cpu path works without PyCUDA or a GPU.
"""
from __future__ import annotations

import logging
from typing import Any

from gpu_worker.backends.base import Backend
from gpu_worker.model.gguf_loader import GGUFModel

BACKEND_KINDS = ("auto", "cpu", "cuda")
log = logging.getLogger(__name__)


def create_backend(kind: str, model: GGUFModel, **cuda_options: Any) -> Backend:
    """A ready backend for `model` (KV not yet allocated).

    cuda_options go to CudaBackend (device_index, max_num_tokens, ...); the cpu backend takes none.
    "auto" falls back to cpu, with a logged reason, when no GPU, PyCUDA or built fatbin is usable.
    """
    if kind not in BACKEND_KINDS:
        raise ValueError(f"backend must be one of {', '.join(BACKEND_KINDS)}, got {kind!r}")
    if kind == "cpu":
        return _create_cpu(model)
    if kind == "cuda":
        return _create_cuda(model, cuda_options)
    reason = cuda_unavailable_reason()
    if reason is None:
        try:
            return _create_cuda(model, cuda_options)
        except RuntimeError as exc:   # CudaBackendError and driver errors: the GPU is not usable
            reason = f"the cuda backend failed to start: {exc}"
    log.warning("backend auto: using cpu because %s", reason)
    return _create_cpu(model)


def cuda_unavailable_reason() -> str | None:
    """None when PyCUDA imports, a GPU is visible and the kernel fatbin is built; else why not."""
    try:
        import pycuda.driver as cuda
    except ImportError as exc:
        return f"PyCUDA is not importable ({exc})"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device is visible"
    except Exception as exc:   # pycuda raises its own error types (no driver, no device)
        return f"the CUDA driver did not initialize ({exc})"
    from gpu_worker.backends.cuda.device import DEFAULT_FATBIN

    if not DEFAULT_FATBIN.is_file():
        return f"the kernel fatbin {DEFAULT_FATBIN} is missing (run `make kernels`)"
    return None


def _create_cpu(model: GGUFModel) -> Backend:
    from gpu_worker.backends.cpu.backend import CpuBackend

    return CpuBackend(model)


def _create_cuda(model: GGUFModel, options: dict[str, Any]) -> Backend:
    from gpu_worker.backends.cuda.backend import CudaBackend

    return CudaBackend(model, **options)
