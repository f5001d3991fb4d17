"""The CUDA device as the backend sees it: context, the prebuilt kernel module, counted memory.

PyCUDA owns the context, the memory and the module (loaded from the fatbin `make kernels` builds:
no run-time compilation). Every allocation goes through `DeviceMemory`, which counts bytes per
purpose so GetModelInfo can report exact weight and KV bytes, and refuses a request larger than
the free VRAM with a message naming both numbers.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_FATBIN = REPO_ROOT / "cuda" / "build" / "qwen_kernels.fatbin"
ALIGNMENT = 256  # bytes; every sub-allocation starts 256-byte aligned (16-byte loads, coalescing)


class CudaBackendError(RuntimeError):
    """A CUDA failure surfaced cleanly (launch error, missing kernels, device problem)."""


class CudaOutOfMemoryError(CudaBackendError):
    def __init__(self, what: str, required_bytes: int, free_bytes: int) -> None:
        super().__init__(f"not enough GPU memory for {what}: need {required_bytes:,} bytes, "
                         f"{free_bytes:,} bytes free")
        self.required_bytes, self.free_bytes = required_bytes, free_bytes


def align_up(nbytes: int, alignment: int = ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class DeviceTensor:
    """A typed view of device memory: `ptr` (int address), C-contiguous `shape`, numpy `dtype`."""

    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        if self.ptr <= 0:
            raise ValueError(f"DeviceTensor needs a device address, got {self.ptr}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"DeviceTensor shape must be non-negative, got {self.shape}")

    @property
    def size(self) -> int:
        return math.prod(self.shape)   # math.prod: per-launch host path, numpy's prod costs ~5 us

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    def view(self, *shape: int) -> DeviceTensor:
        """Same memory, another shape with at most as many elements (leading part)."""
        if math.prod(shape) > self.size:
            raise ValueError(f"view {shape} is larger than tensor {self.shape}")
        return DeviceTensor(self.ptr, tuple(shape), self.dtype)

    def rows(self, start: int, stop: int) -> DeviceTensor:
        """Rows [start, stop) along the first axis."""
        if not (0 <= start <= stop <= self.shape[0]):
            raise ValueError(f"rows [{start}, {stop}) outside [0, {self.shape[0]})")
        row_bytes = self.nbytes // max(self.shape[0], 1)
        return DeviceTensor(self.ptr + start * row_bytes, (stop - start, *self.shape[1:]), self.dtype)


class DeviceMemory:
    """Allocations of one backend, counted per purpose ("weights", "kv", "activations", ...)."""

    def __init__(self, cuda_driver) -> None:  # cuda_driver: the pycuda.driver module
        self._cuda = cuda_driver
        self._allocations: list = []
        self.bytes_by_purpose: dict[str, int] = {}

    def free_bytes(self) -> int:
        return int(self._cuda.mem_get_info()[0])

    def allocate(self, purpose: str, nbytes: int) -> int:
        """A fresh, 256-byte aligned block of `nbytes`; its address."""
        nbytes = align_up(max(nbytes, 1))
        free = self.free_bytes()
        if nbytes > free:
            raise CudaOutOfMemoryError(purpose, nbytes, free)
        try:
            allocation = self._cuda.mem_alloc(nbytes)
        except self._cuda.MemoryError as exc:
            raise CudaOutOfMemoryError(purpose, nbytes, self.free_bytes()) from exc
        self._allocations.append(allocation)
        self.bytes_by_purpose[purpose] = self.bytes_by_purpose.get(purpose, 0) + nbytes
        return int(allocation)

    def tensor(self, purpose: str, shape: tuple[int, ...], dtype) -> DeviceTensor:
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return DeviceTensor(self.allocate(purpose, nbytes), tuple(shape), dtype)

    def release(self) -> None:
        for allocation in self._allocations:
            allocation.free()
        self._allocations.clear()
        self.bytes_by_purpose.clear()


class CudaDevice:
    """Context on one GPU + the kernel module. `kernel(name)` returns a kernel called like a PyCUDA
    function; how it launches (launch_mode) is launcher.py's."""

    def __init__(self, device_index: int = 0, fatbin_path: str | os.PathLike[str] | None = None) -> None:
        import pycuda.driver as cuda  # imported here: the package works without PyCUDA

        self.cuda = cuda
        cuda.init()
        if not (0 <= device_index < cuda.Device.count()):
            raise CudaBackendError(f"no CUDA device {device_index} ({cuda.Device.count()} present)")
        self.device = cuda.Device(device_index)
        self.context = self.device.make_context()
        self.name: str = self.device.name()
        self.multiprocessors: int = self.device.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.fatbin_path = Path(fatbin_path) if fatbin_path else DEFAULT_FATBIN
        if not self.fatbin_path.is_file():
            self.context.pop()
            raise CudaBackendError(f"kernel fatbin {self.fatbin_path} is missing: run `make kernels` (needs nvcc)")
        from gpu_worker.backends.cuda import launcher

        try:
            self.launch_mode = launcher.launch_mode()
            self.module = self._load_module(self.launch_mode)
        except Exception:
            self.context.pop()
            raise
        self.stream = cuda.Stream()
        self.memory = DeviceMemory(cuda)
        self._kernels: dict[str, object] = {}
        self._owns_context = self._owns_module = True

    def _load_module(self, launch_mode: str):
        """The fatbin as PyCUDA's module ("pycuda"), or as launcher.DriverModule ("driver")."""
        from gpu_worker.backends.cuda import launcher

        if launch_mode not in launcher.LAUNCH_MODES:
            raise CudaBackendError(f"launch mode {launch_mode!r}: must be one of {launcher.LAUNCH_MODES}")
        if launch_mode == "pycuda":
            return self.cuda.module_from_file(str(self.fatbin_path))
        return launcher.DriverModule(self.fatbin_path, pdl=launcher.pdl_enabled(self.device.compute_capability()))

    def child(self, launch_mode: str | None = None) -> CudaDevice:
        """The same context and stream with its own counted memory (a backend that shares a device,
        e.g. in tests); closing the child frees only its own allocations. With `launch_mode`, the
        child launches that way through a module of its own (tests compare launch modes)."""
        other = copy.copy(self)
        other.memory = DeviceMemory(self.cuda)
        other._owns_context = other._owns_module = False
        if launch_mode is not None and launch_mode != self.launch_mode:
            other.module, other.launch_mode, other._kernels = self._load_module(launch_mode), launch_mode, {}
            other._owns_module = True
        return other

    def kernel(self, name: str, dynamic_shared_bytes: int = 0):
        """The fatbin's kernel `name`; one that launches with more than the default 48 KiB of
        dynamic shared memory is opted in to `dynamic_shared_bytes` on first use."""
        if name not in self._kernels:
            try:
                function = self.module.get_function(name)
            except (self.cuda.LogicError, LookupError) as exc:
                raise CudaBackendError(f"kernel {name} is not in the fatbin: rebuild with `make kernels`") from exc
            if dynamic_shared_bytes > 48 * 1024:
                function.set_attribute(self.cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       dynamic_shared_bytes)
            self._kernels[name] = function
        return self._kernels[name]

    @contextlib.contextmanager
    def activate(self) -> Iterator[CudaDevice]:
        """Makes this device's context current for the block (for processes with other contexts,
        e.g. test sessions that also use pycuda.autoinit)."""
        self.context.push()
        try:
            yield self
        finally:
            self.cuda.Context.pop()

    def synchronize(self) -> None:
        """Waits for the stream; a device fault raised by an earlier launch surfaces here."""
        try:
            self.stream.synchronize()
        except self.cuda.Error as exc:
            raise CudaBackendError(f"CUDA error on {self.name}: {exc}") from exc

    def close(self) -> None:
        self.memory.release()
        if self._owns_module and hasattr(self.module, "unload"):   # launcher.DriverModule; PyCUDA's frees itself
            self.module.unload()
        if self._owns_context:
            self.context.pop()
            self.context.detach()
