"""Kernel launches through the CUDA driver (ctypes on libcuda), which can be recorded and replayed.

PyCUDA owns the context, the memory and the streams. Launching through it costs the host 8-11 us
per kernel, and the ops' Python around each launch (shape checks, tile plans, argument records)
about as much again: an eager forward (~530 launches for a prefill) took 5-10 ms of host time on
the GPU machine, more than the GPU needs for a prompt of a few hundred tokens.

This module loads the fatbin with cuModuleLoadData (into PyCUDA's context, instead of PyCUDA's
own module) and launches with cuLaunchKernelEx. Each launch is built once as a PreparedLaunch (packed arguments, launch config);
DriverModule.recording() keeps the launches of a block, and RecordedLaunches.replay() enqueues
them again with one foreign call each. Qwen2Forward records each eager shape once and replays it
after (its launches read every per-step input from static buffers, as a CUDA graph's do).

Launch modes (QWEN_SERVE_CUDA_LAUNCH): "driver" (the default) or "pycuda" (PyCUDA's own module
and launches; nothing is recorded). In "driver" mode on sm_90+ the kernels written for it
(pdl_aware, cuda/pdl.cuh) launch with programmatic dependent launch in the small decode graphs
(QWEN_SERVE_CUDA_PDL=0 turns it off, see pdl_enabled): a kernel's CTAs are scheduled while the
previous kernel finishes, so the launch latency between them overlaps. DriverModule mimics the slice of PyCUDA's Module / Function
API the ops use (get_function, prepare, prepared_async_call, __call__, set_attribute), so every op
launches through either unchanged.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpu_worker.backends.cuda.device import CudaBackendError

LAUNCH_ENV = "QWEN_SERVE_CUDA_LAUNCH"
PDL_ENV = "QWEN_SERVE_CUDA_PDL"
LAUNCH_MODES = ("driver", "pycuda")

# From cuda.h (CUDA 12+).
_CUDA_SUCCESS = 0
_CUDA_ERROR_NOT_FOUND = 500
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0   # CU_LAUNCH_PARAM_*


_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
# Kernels written for programmatic dependent launch (cuda/pdl.cuh: they wait for the previous kernel
# before touching what it wrote, and let the next one start late). The gemm layouts of linear_mma are not.
PDL_KERNEL_PREFIXES = ("linear_mma_", "attention_mma", "embedding_", "rms_norm_f32")
PDL_EXCLUDED_PREFIXES = ("linear_mma_gemm",)


def pdl_aware(name: str) -> bool:
    return name.startswith(PDL_KERNEL_PREFIXES) and not name.startswith(PDL_EXCLUDED_PREFIXES)


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union (an int for PDL)."""
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


def _pdl_attributes() -> ctypes.Array:
    attrs = (LaunchAttribute * 1)()
    attrs[0].id = _ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attrs[0].value[0] = 1   # programmaticStreamSerializationAllowed
    return attrs


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig; attrs: null, or the PDL attribute (_pdl_attributes) for pdl_aware kernels."""
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]


class KernelNotFound(CudaBackendError, LookupError):
    pass


def pdl_enabled(compute_capability: tuple[int, int]) -> bool:
    """Programmatic dependent launch for the pdl_aware kernels (inside DriverModule.programmatic_launches:
    the decode graphs of up to backend.PDL_MAX_TOKENS tokens) on sm_90+, unless QWEN_SERVE_CUDA_PDL=0.

    Real model on an H200 (session 12, 6d77955 kernels): the decode graph at batch 1 / 2 / 4 / 8 takes
    855 / 945 / 1,090 / 1,207 us with it against 883 / 969 / 1,128 / 1,256 without. With PDL on every
    launch (b60f7c4) 256 concurrent gRPC streams had measured slower (median ~35k against ~42k tok/s);
    restricted to the small decode graphs, three interleaved runs each gave 31.3 / 36.5 / 38.7k with it
    and 31.5 / 33.3 / 37.4k without (a noisier machine than b60f7c4's)."""
    setting = os.environ.get(PDL_ENV, "").strip() or "1"
    if setting not in ("0", "1"):
        raise CudaBackendError(f"{PDL_ENV}={setting!r}: must be 0 or 1")
    return setting == "1" and tuple(compute_capability) >= (9, 0)


def launch_mode() -> str:
    """QWEN_SERVE_CUDA_LAUNCH if set, else "driver"."""
    mode = os.environ.get(LAUNCH_ENV, "").strip() or "driver"
    if mode not in LAUNCH_MODES:
        raise CudaBackendError(f"{LAUNCH_ENV}={mode!r}: must be one of {', '.join(LAUNCH_MODES)}")
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
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        lib.cuLaunchKernelEx   # noqa: B018 (CUDA 12+ drivers export it)
    except (OSError, AttributeError) as exc:
        raise CudaBackendError(f"the CUDA driver library cannot launch through cuLaunchKernelEx ({exc}); "
                               f"{LAUNCH_ENV}=pycuda launches through PyCUDA instead") from exc
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


class PreparedLaunch:
    """One launch with its arguments packed and its CUlaunchConfig built: run() enqueues it."""

    __slots__ = ("_attrs", "_config", "_extra", "_handle", "_lib", "_name", "_params", "_size")

    def __init__(self, lib, handle: int, name: str, grid, block, stream, params: bytes, shared_bytes: int,
                 attrs: ctypes.Array | None = None) -> None:
        grid3 = tuple(grid) + (1,) * (3 - len(grid))
        block3 = tuple(block) + (1,) * (3 - len(block))
        self._lib, self._handle, self._name = lib, handle, name
        self._params = ctypes.create_string_buffer(params, max(len(params), 1))
        self._size = ctypes.c_size_t(len(params))
        self._extra = (ctypes.c_void_p * 5)(_PARAM_BUFFER_POINTER, ctypes.addressof(self._params),
                                            _PARAM_BUFFER_SIZE, ctypes.addressof(self._size), _PARAM_END)
        self._attrs = attrs   # kept referenced: the config points at it
        self._config = LaunchConfig((ctypes.c_uint * 3)(*grid3), (ctypes.c_uint * 3)(*block3), shared_bytes,
                                    0 if stream is None else stream.handle,
                                    None if attrs is None else ctypes.addressof(attrs),
                                    0 if attrs is None else len(attrs))

    def run(self) -> None:
        code = self._lib.cuLaunchKernelEx(ctypes.byref(self._config), self._handle, None, self._extra)
        if code != _CUDA_SUCCESS:
            c = self._config
            raise CudaBackendError(f"launch of {self._name} (grid {tuple(c.grid)}, block {tuple(c.block)}, "
                                   f"{c.shared_bytes} B shared) failed: {_error_name(self._lib, code)}")


class RecordedLaunches:
    """Launches kept by DriverModule.recording(), replayed in order with the same arguments: the
    host cost of a forward without any of its Python (a host-side analogue of a CUDA graph, for
    shapes that come too seldom to capture one each)."""

    def __init__(self) -> None:
        self.launches: list[PreparedLaunch] = []

    def __len__(self) -> int:
        return len(self.launches)

    def replay(self) -> None:
        for launch in self.launches:
            launch.run()

    def close(self) -> None:
        """Nothing to free (host-side records); StreamGraph.close's counterpart."""


class DriverKernel:
    """One kernel of a DriverModule, called like a PyCUDA Function."""

    def __init__(self, module: DriverModule, handle: int, name: str) -> None:
        self._module, self._lib, self._handle, self.function_name = module, module._lib, handle, name
        self._format: str | None = None
        self.pdl_aware = pdl_aware(name)   # launched with the PDL attribute inside programmatic_launches()

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
        pdl = self.pdl_aware and self._module.pdl_active
        launch = PreparedLaunch(self._lib, self._handle, self.function_name, grid, block, stream, params,
                                shared_bytes, self._module.pdl_attributes if pdl else None)
        launch.run()
        if self._module._recording is not None:
            self._module._recording.launches.append(launch)


class DriverModule:
    """The fatbin loaded with cuModuleLoadData into the current (PyCUDA's) context."""

    def __init__(self, path: str | os.PathLike[str], lib=None, pdl: bool = False) -> None:
        """pdl: programmatic_launches() may launch the pdl_aware kernels with programmatic dependent
        launch (pdl_enabled: the setting and an sm_90+ device)."""
        self._lib = lib if lib is not None else _libcuda()
        self.pdl = pdl
        self.pdl_active = False
        self.pdl_attributes = _pdl_attributes()
        self.path = Path(path)
        handle = ctypes.c_void_p()
        code = self._lib.cuModuleLoadData(ctypes.byref(handle), self.path.read_bytes())
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"cuModuleLoadData({self.path}) failed: {_error_name(self._lib, code)}")
        self._handle = handle.value
        self._recording: RecordedLaunches | None = None

    @contextlib.contextmanager
    def programmatic_launches(self, wanted: bool = True) -> Iterator[None]:
        """Launches of pdl_aware kernels in the block carry the PDL attribute, if wanted and self.pdl.
        A recording or graph capture made in the block keeps it."""
        previous, self.pdl_active = self.pdl_active, self.pdl and wanted
        try:
            yield
        finally:
            self.pdl_active = previous

    @contextlib.contextmanager
    def recording(self) -> Iterator[RecordedLaunches]:
        """Launches made in the block run as usual and are also kept, in order, in the yielded
        RecordedLaunches. What they read (pointers, sizes) and their stream are baked in, as in a
        graph capture."""
        if self._recording is not None:
            raise CudaBackendError("launch recordings do not nest")
        self._recording = RecordedLaunches()
        try:
            yield self._recording
        finally:
            self._recording = None

    def get_function(self, name: str) -> DriverKernel:
        handle = ctypes.c_void_p()
        code = self._lib.cuModuleGetFunction(ctypes.byref(handle), self._handle, name.encode())
        if code == _CUDA_ERROR_NOT_FOUND:
            raise KernelNotFound(f"kernel {name} is not in {self.path}")
        if code != _CUDA_SUCCESS:
            raise CudaBackendError(f"cuModuleGetFunction({name}) failed: {_error_name(self._lib, code)}")
        return DriverKernel(self, handle.value, name)

    def unload(self) -> None:
        if self._handle:
            self._lib.cuModuleUnload(self._handle)
            self._handle = None
