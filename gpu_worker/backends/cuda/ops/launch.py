"""Shared launcher helpers: argument checks and the one checked launch call every op uses."""
from __future__ import annotations

import functools

import numpy as np

from gpu_worker.backends.cuda.device import CudaBackendError, DeviceTensor


def check_tensor(name: str, tensor: DeviceTensor, shape: tuple[int, ...], dtype) -> None:
    """ValueError unless `tensor` has exactly `shape` (None = any) and `dtype`."""
    if np.dtype(tensor.dtype) != np.dtype(dtype):
        raise ValueError(f"{name} must be {np.dtype(dtype).name}, got {np.dtype(tensor.dtype).name}")
    if len(tensor.shape) != len(shape) or any(want is not None and got != want
                                               for got, want in zip(tensor.shape, shape)):
        raise ValueError(f"{name} must have shape {shape}, got {tensor.shape}")


def ptr(tensor: DeviceTensor | None) -> np.uintp:
    """A kernel pointer argument (null for None)."""
    return np.uintp(0 if tensor is None else tensor.ptr)


def launch(kernel, grid: tuple[int, ...], block: tuple[int, ...], stream, *args, shared: int = 0) -> None:
    """Launches on `stream` (with `shared` bytes of dynamic shared memory); a launch the driver
    refuses becomes a CudaBackendError naming it."""
    if any(g <= 0 for g in grid):
        return  # nothing to do (empty batch)
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    block3 = tuple(block) + (1,) * (3 - len(block))
    try:
        kernel(*args, grid=grid3, block=block3, stream=stream, shared=shared)
    except Exception as exc:  # pycuda.driver.Error subclasses; re-raised with the kernel named
        raise CudaBackendError(f"launch of {getattr(kernel, 'function_name', kernel)} failed: {exc}") from exc


@functools.cache
def _record_dtype(fields: tuple[tuple[str, str], ...]) -> np.dtype:
    return np.dtype(list(fields), align=True)


def record(fields: list[tuple[str, str]], values: dict[str, object]) -> np.void:
    """A by-value struct argument: numpy record laid out like the C struct (align=True)."""
    dtype = _record_dtype(tuple(fields))
    array = np.zeros(1, dtype)
    for key, value in values.items():
        array[key] = value
    return array[0]
