"""Kernel launches through the CUDA driver's cuLaunchKernelEx, with programmatic dependent launch.

PyCUDA owns the context, the memory and the streams, but it launches with cuLaunchKernel: no
launch attributes, and 8-11 us of host time per launch. This module loads the same fatbin a second
time through the driver API (ctypes on libcuda) and launches its kernels with cuLaunchKernelEx:
- "pdl": with the programmatic-stream-serialization attribute (sm_90+). A kernel's CTAs start
  while the kernel before it finishes; they prefetch what no kernel writes (weights), then wait
  for it (cuda/pdl.cuh). A decode step is ~250 short dependent kernels, and the drain and ramp
  between two of them is a large part of each one's time.
- "driver": the same launch without the attribute (to measure what PDL alone brings).
- "pycuda": PyCUDA's own module and launches.
The ctypes launch costs less host time than PyCUDA's (one struct.pack, one foreign call), which
prefill steps (~530 launches enqueued from Python) feel directly.

DriverModule mimics the slice of PyCUDA's Module / Function API the ops use (get_function,
prepare, prepared_async_call, __call__, set_attribute), so every op launches through it unchanged.
"""
from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import numpy as np

from gpu_worker.backends.cuda.device import CudaBackendError

LAUNCH_ENV = "QWEN_SERVE_CUDA_LAUNCH"
LAUNCH_MODES = ("pdl", "driver", "pycuda")

# From cuda.h (CUDA 12+).
_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_FOUND = 500
_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0   # CU_LAUNCH_PARAM_*


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (an int for PDL)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


class KernelNotFound(CudaBackendError, LookupError):
    pass


def launch_mode(compute_capability: tuple[int, int]) -> str:
    """QWEN_SERVE_CUDA_LAUNCH if set, else "pdl" on sm_90+ and "driver" below (no PDL there)."""
    mode = os.environ.get(LAUNCH_ENV, "").strip() or ("pdl" if compute_capability >= (9, 0) else "driver")
    if mode not in LAUNCH_MODES:
        raise CudaBackendError(f"{LAUNCH_ENV}={mode!r}: must be one of {', '.join(LAUNCH_MODES)}")
    if mode == "pdl" and compute_capability < (9, 0):
        raise CudaBackendError(f"{LAUNCH_ENV}=pdl needs compute capability 9.0+, this GPU has "
                               f"{compute_capability[0]}.{compute_capability[1]}")
    return mode


def pack_arguments(args: tuple) -> bytes:
    """Kernel parameters as the C ABI lays them out: each numpy scalar or record (align=True) at
    the next multiple of its alignment."""
    out = bytearray()
    for arg in args:
        if not isinstance(arg, np.generic):
            raise TypeError(f"kernel arguments must be numpy scalars or records, got {type(arg).__name__}")
        out += bytes(-len(out) % arg.dtype.alignment)
        out += arg.tobytes()
    return bytes(out)


def _libcuda():
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuModuleLoadData.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    lib.cuModuleGetFunction.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_char_p]
    lib.cuModuleUnload.argtypes = [ctypes.c_void_p]
    lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(LaunchConfig), ctypes.c_void_p, ctypes.c_void_p,
                                     ctypes.c_void_p]
    lib.cuGetErrorName.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _error_name(lib, code: int) -> str:
    name = ctypes.c_char_p()
    if lib.cuGetErrorName(code, ctypes.byref(name)) == _CUDA_SUCCESS and name.value:
        return name.value.decode()
    return f"CUresult {code}"


class DriverKernel:
    """One kernel of a DriverModule, called like a PyCUDA Function."""

    def __init__(self, lib, handle: int, name: str, attrs, num_attrs: int) -> None:
        self._lib, self._handle, self.function_name = lib, handle, name
        self._attrs, self._num_attrs = attrs, num_attrs
        self._format: str | None = None

    def prepare(self, arg_format: str) -> DriverKernel:
        """PyCUDA's prepared-call format ("P" pointer, "i" int, "q" long long, "f" float):
        struct's native layout is the C ABI's."""
        self._format = arg_format
        return self

    def set_attribute(self, attribute, value: int) -> None:
        """cuFuncSetAttribute; `attribute` is a CUfunction_attribute (PyCUDA's enum converts)."""
        code = self._lib.cuFuncSetAttribute(self._handle, int(attribute), int(value))
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"cuFuncSetAttribute({self.function_name}, {int(attribute)}, {value}) failed: "
                                   f"{_error_name(self._lib, code)}")

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        if self._format is None:
            raise CudaBackendError(f"{self.function_name}: prepared_async_call before prepare")
        self._launch(grid, block, stream, struct.pack(self._format, *args), shared_size)

    def __call__(self, *args, grid, block, stream=None, shared: int = 0) -> None:
        self._launch(grid, block, stream, pack_arguments(args), shared)

    def _launch(self, grid, block, stream, params: bytes, shared_bytes: int) -> None:
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        block3 = tuple(block) + (1,) * (3 - len(block))
        buffer = ctypes.create_string_buffer(params, max(len(params), 1))
        size = ctypes.c_size_t(len(params))
        extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(buffer), _PARAM_BUFFER_SIZE,
                                      ctypes.addressof(size), _PARAM_END)
        config = LaunchConfig((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_bytes,
                              0 if stream is None else stream.handle, self._attrs, self._num_attrs)
        code = self._lib.cuLaunchKernelEx(ctypes.byref(config), self._handle, None, extra)
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"launch of {self.function_name} (grid {grid3}, block {block3}, "
                                   f"{shared_bytes} B shared) failed: {_error_name(self._lib, code)}")


class DriverModule:
    """The fatbin loaded with cuModuleLoadData into the current (PyCUDA's) context."""

    def __init__(self, path: str | os.PathLike[str], pdl: bool, lib=None) -> None:
        self._lib = lib if lib is not None else _libcuda()
        self.path, self.pdl = Path(path), pdl
        handle = ctypes.c_void_p()
        code = self._lib.cuModuleLoadData(ctypes.byref(handle), self.path.read_bytes())
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"cuModuleLoadData({self.path}) failed: {_error_name(self._lib, code)}")
        self._handle = handle.value
        self._attrs = (LaunchAttribute * 1)()
        self._attrs[0].id = _ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        self._attrs[0].value[0] = 1   # programmaticStreamSerializationAllowed

    def get_function(self, name: str) -> DriverKernel:
        handle = ctypes.c_void_p()
        code = self._lib.cuModuleGetFunction(ctypes.byref(handle), self._handle, name.encode())
        if code == _CUDA_ERROR_NOT_FOUND:
            raise KernelNotFound(f"kernel {name} is not in {self.path}")
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"cuModuleGetFunction({name}) failed: {_error_name(self._lib, code)}")
        return DriverKernel(self._lib, handle.value, name, self._attrs if self.pdl else None, 1 if self.pdl else 0)

    def unload(self) -> None:
        if self._handle:
            self._lib.cuModuleUnload(self._handle)
            self._handle = None
