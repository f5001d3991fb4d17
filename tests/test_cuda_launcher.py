"""gpu_worker/backends/cuda/launcher.py on the CPU: the ctypes mirror of cuda.h's launch config, the
kernel parameter layout, the launch-mode setting, what reaches cuLaunchKernelEx, and recorded
launches replayed (through a stand-in for libcuda that keeps what it is given). On the GPU,
tests/gpu/test_cuda_backend.py checks that PyCUDA's launches, the driver's and replayed ones give
bitwise the same forward."""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest

from gpu_worker.backends.cuda.device import CudaBackendError
from gpu_worker.backends.cuda.launcher import (
    LAUNCH_ENV,
    PDL_ENV,
    DriverModule,
    KernelNotFound,
    LaunchAttribute,
    LaunchConfig,
    launch_mode,
    pack_arguments,
    pdl_aware,
    pdl_enabled,
)


def test_launch_config_matches_cuda_h_layout():
    # CUlaunchConfig: 7 unsigned ints, the stream pointer at 32, attrs at 40, numAttrs at 48.
    assert ctypes.sizeof(LaunchConfig) == 56
    assert (LaunchConfig.stream.offset, LaunchConfig.attrs.offset, LaunchConfig.num_attrs.offset) == (32, 40, 48)
    assert LaunchConfig.shared_bytes.offset == 24


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
    assert launch_mode() == "driver"
    monkeypatch.setenv(LAUNCH_ENV, "pycuda")
    assert launch_mode() == "pycuda"
    monkeypatch.setenv(LAUNCH_ENV, "fast")
    with pytest.raises(CudaBackendError, match=LAUNCH_ENV):
        launch_mode()


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
        self.launches.append({"function": function, "grid": tuple(config.grid), "block": tuple(config.block),
                              "shared": config.shared_bytes, "stream": config.stream,
                              "attrs": (config.attrs, config.num_attrs), "params": ctypes.string_at(extra[1], size)})
        return 0

    def cuModuleUnload(self, module):
        self.unloaded.append(module)
        return 0

    def cuGetErrorName(self, code, name_ref):
        return 1


class FakeStream:
    handle = 0x5000


def test_launches_reach_culaunchkernelex_with_their_config(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"\x7fimage")
    lib = RecordingLibcuda()
    module = DriverModule(fatbin, lib=lib)
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
    assert first["attrs"] == (None, 0) and second["attrs"] == (None, 0)
    module.unload()
    module.unload()
    assert lib.unloaded == [0xABC]


def test_recorded_launches_replay_in_order_with_the_same_arguments(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"x")
    lib = RecordingLibcuda()
    module = DriverModule(fatbin, lib=lib)
    first, second = module.get_function("a"), module.get_function("bb").prepare("Pi")
    with module.recording() as recorded:
        first(np.int32(1), grid=(2,), block=(32,), stream=FakeStream())
        second.prepared_async_call((3,), (64,), FakeStream(), 7, 8)
    first(np.int32(99), grid=(1,), block=(32,), stream=FakeStream())   # after the block: not recorded
    assert len(recorded) == 2 and len(lib.launches) == 3
    recorded.replay()
    recorded.replay()
    assert lib.launches[3:] == lib.launches[:2] * 2


def test_a_recording_does_not_nest(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"x")
    module = DriverModule(fatbin, lib=RecordingLibcuda())
    with module.recording(), pytest.raises(CudaBackendError, match="nest"), module.recording():
        pass


def test_a_driver_without_culaunchkernelex_names_the_fallback(tmp_path, monkeypatch):
    def no_library(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"x")
    with pytest.raises(CudaBackendError, match=f"{LAUNCH_ENV}=pycuda"):
        DriverModule(fatbin)


def test_missing_kernels_and_unprepared_calls_are_named(tmp_path):
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"x")
    module = DriverModule(fatbin, lib=RecordingLibcuda())
    with pytest.raises(KernelNotFound, match="missing"):
        module.get_function("missing")
    with pytest.raises(CudaBackendError, match="before prepare"):
        module.get_function("k").prepared_async_call((1,), (32,), FakeStream(), 1)


def test_pdl_attribute_matches_cuda_h_and_reaches_only_pdl_aware_kernels(tmp_path, monkeypatch):
    """CUlaunchAttribute is 72 bytes (id, pad, 64-byte value); with pdl=True the kernels written for
    programmatic dependent launch (cuda/pdl.cuh) carry attribute 6 = 1 inside programmatic_launches(),
    the others (the gemm layouts, the sampler) none, and nothing outside the block or with pdl=False.
    PDL is used on sm_90+ unless QWEN_SERVE_CUDA_PDL=0."""
    assert ctypes.sizeof(LaunchAttribute) == 72 and LaunchAttribute.value.offset == 8
    assert pdl_aware("linear_mma_norm_q5_0_g1") and pdl_aware("linear_mma_narrow_acc_q6_k_g2")
    assert pdl_aware("attention_mma_decode") and pdl_aware("embedding_q5_0") and pdl_aware("rms_norm_f32")
    assert not pdl_aware("linear_mma_gemm32_q5_0_g8") and not pdl_aware("linear_f16_gemm_g8")
    assert not pdl_aware("sample_greedy") and not pdl_aware("f32_to_f16")
    fatbin = tmp_path / "k.fatbin"
    fatbin.write_bytes(b"\x7fimage")
    lib = RecordingLibcuda()
    module = DriverModule(fatbin, lib=lib, pdl=True)
    aware, unaware = module.get_function("linear_mma_q5_0_g1"), module.get_function("linear_mma_gemm_q5_0_g8")
    with module.programmatic_launches():
        aware(np.int32(1), grid=(1,), block=(128,), stream=FakeStream())
        unaware(np.int32(1), grid=(1,), block=(256,), stream=FakeStream())
        with module.programmatic_launches(False):   # nested: this block wants none
            aware(np.int32(1), grid=(1,), block=(128,), stream=FakeStream())
        aware(np.int32(1), grid=(1,), block=(128,), stream=FakeStream())
    aware(np.int32(1), grid=(1,), block=(128,), stream=FakeStream())   # outside the block
    (pdl_address, pdl_count), plain = lib.launches[0]["attrs"], lib.launches[1]["attrs"]
    attribute = LaunchAttribute.from_address(pdl_address)
    assert pdl_count == 1 and attribute.id == 6 and attribute.value[0] == 1 and plain == (None, 0)
    assert [launch["attrs"][1] for launch in lib.launches[2:]] == [0, 1, 0]
    off = DriverModule(fatbin, lib=lib, pdl=False)   # the setting or the device rules it out
    with off.programmatic_launches():
        off.get_function("linear_mma_q5_0_g1")(np.int32(1), grid=(1,), block=(128,), stream=FakeStream())
    assert lib.launches[-1]["attrs"] == (None, 0)
    monkeypatch.delenv(PDL_ENV, raising=False)
    assert pdl_enabled((9, 0)) and not pdl_enabled((8, 9))   # on by default where the device has it
    monkeypatch.setenv(PDL_ENV, "1")
    assert pdl_enabled((9, 0)) and not pdl_enabled((8, 9))
    monkeypatch.setenv(PDL_ENV, "0")
    assert not pdl_enabled((9, 0))
    monkeypatch.setenv(PDL_ENV, "yes")
    with pytest.raises(CudaBackendError, match=PDL_ENV):
        pdl_enabled((9, 0))
