"""gpu_worker/backends/cuda/launcher.py on the CPU: the ctypes mirrors of cuda.h's launch structs,
the kernel parameter layout, the launch-mode setting, and what reaches cuLaunchKernelEx (through a
recording stand-in for libcuda). On the GPU, tests/gpu/test_cuda_backend.py checks that every
launch mode gives bitwise the same forward."""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest

from gpu_worker.backends.cuda.device import CudaBackendError
from gpu_worker.backends.cuda.launcher import (LAUNCH_ENV, DriverModule, KernelNotFound, LaunchAttribute,
                                               LaunchConfig, launch_mode, pack_arguments)


def test_structs_match_cuda_h_layout():
    # CUlaunchConfig: 7 unsigned ints, the stream pointer at 32, attrs at 40, numAttrs at 48.
    assert ctypes.sizeof(LaunchConfig) == 56
    assert (LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert LaunchConfig.shared_bytes.offset == 24
    # CUlaunchAttribute: id, padding to 8, a 64-byte union.
    assert ctypes.sizeof(LaunchAttribute) == 72 and LaunchAttribute.value.offset == 8


def test_arguments_are_laid_out_like_c_parameters():
    """The same bytes as struct's native layout (the C ABI) for the same types."""
    args = (np.uintp(0x1122334455), np.int32(-7), np.uintp(9), np.float32(1.5), np.int32(3), np.int64(2**40))
    assert pack_arguments(args) == struct.pack("PiPfiq", 0x1122334455, -7, 9, 1.5, 3, 2**40)


def test_a_record_argument_is_aligned_to_its_widest_field():
    dtype = np.dtype([("ptr", "u8"), ("n", "i4")], align=True)   # 16 bytes, 8-aligned
    rec = np.zeros(1, dtype)[0]
    rec["ptr"], rec["n"] = 5, 6
    packed = pack_arguments((np.int32(1), rec))
    assert len(packed) == 8 + 16
    assert packed[:4] == struct.pack("i", 1) and packed[4:8] == bytes(4)
    assert packed[8:] == struct.pack("Qi", 5, 6) + bytes(4)


def test_python_ints_are_refused():
    with pytest.raises(TypeError, match="numpy scalars"):
        pack_arguments((np.int32(1), 2))


def test_launch_mode_defaults_and_checks(monkeypatch):
    monkeypatch.delenv(LAUNCH_ENV, raising=False)
    assert launch_mode((9, 0)) == "pdl"
    assert launch_mode((8, 6)) == "driver"
    monkeypatch.setenv(LAUNCH_ENV, "pycuda")
    assert launch_mode((9, 0)) == "pycuda"
    monkeypatch.setenv(LAUNCH_ENV, "pdl")
    with pytest.raises(CudaBackendError, match="compute capability 9.0"):
        launch_mode((8, 0))
    monkeypatch.setenv(LAUNCH_ENV, "fast")
    with pytest.raises(CudaBackendError, match=LAUNCH_ENV):
        launch_mode((9, 0))


class RecordingLibcuda:
    """Stands in for libcuda: hands out handles and records each launch's config and parameters."""

    def __init__(self):
        self.launches, self.attributes, self.unloaded = [], [], []

    def cuModuleLoadData(self, handle_ref, image):
        self.image = image
        handle_ref._obj.value = 0xABC
        return 0

    def cuModuleGetFunction(self, handle_ref, module, name):
        if name == b"missing":
            return 500   # CUDA_ERROR_NOT_FOUND
        handle_ref._obj.value = 0x1000 + len(name)
        return 0

    def cuFuncSetAttribute(self, function, attribute, value):
        self.attributes.append((function, attribute, value))
        return 0

    def cuLaunchKernelEx(self, config_ref, function, kernel_params, extra):
        config = config_ref._obj
        assert kernel_params is None and extra[0] == 1 and extra[2] == 2 and extra[4] is None
        size = ctypes.c_size_t.from_address(extra[3]).value
        attrs = [(config.attrs[i].id, config.attrs[i].value[0]) for i in range(config.num_attrs)]
        self.launches.append({"function": function, "grid": tuple(config.grid), "block": tuple(config.block),
                              "shared": config.shared_bytes, "stream": config.stream, "attrs": attrs,
                              "params": ctypes.string_at(extra[1], size)})
        return 0

    def cuModuleUnload(self, module):
        self.unloaded.append(module)
        return 0

    def cuGetErrorName(self, code, name_ref):
        return 1


class FakeStream:
    handle = 0x5000


@pytest.mark.parametrize("pdl", [True, False])
def test_launches_reach_culaunchkernelex_with_their_config(tmp_path, pdl):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"\x7fimage")
    lib = RecordingLibcuda()
    module = DriverModule(fatbin, pdl=pdl, lib=lib)
    assert lib.image == b"\x7fimage"
    kernel = module.get_function("rms_norm_f32")
    kernel.set_attribute(8, 100_000)
    kernel(np.uintp(1), np.int32(2), grid=(3, 2), block=(128,), stream=FakeStream(), shared=64)
    prepared = module.get_function("linear").prepare("PiiP")
    prepared.prepared_async_call((5, 1), (128, 1, 1), FakeStream(), 10, 11, 12, 13, shared_size=4096)
    first, second = lib.launches
    assert first["grid"] == (3, 2, 1) and first["block"] == (128, 1, 1) and first["shared"] == 64
    assert first["stream"] == 0x5000 and first["params"] == struct.pack("Pi", 1, 2)
    assert second["grid"] == (5, 1, 1) and second["shared"] == 4096
    assert second["params"] == struct.pack("PiiP", 10, 11, 12, 13)
    assert lib.attributes == [(0x1000 + len("rms_norm_f32"), 8, 100_000)]
    want_attrs = [(6, 1)] if pdl else []   # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 1
    assert first["attrs"] == want_attrs and second["attrs"] == want_attrs
    module.unload()
    module.unload()
    assert lib.unloaded == [0xABC]


def test_missing_kernels_and_unprepared_calls_are_named(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"x")
    module = DriverModule(fatbin, pdl=True, lib=RecordingLibcuda())
    with pytest.raises(KernelNotFound, match="missing"):
        module.get_function("missing")
    with pytest.raises(CudaBackendError, match="before prepare"):
        module.get_function("k").prepared_async_call((1,), (32,), FakeStream(), 1)
