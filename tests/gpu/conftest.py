"""GPU test fixtures: one CUDA device (context + prebuilt fatbin) per session, skipped cleanly
where PyCUDA, a GPU or the built kernels are missing; helpers to move arrays on and off it."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.backends.cuda.device import DEFAULT_FATBIN, DeviceTensor


def _skip_reason() -> str | None:
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "PyCUDA is not installed"
    try:
        cuda.init()
        if cuda.Device.count() == 0:
            return "no CUDA device"
    except Exception as exc:  # pycuda.driver.Error: no driver / no device
        return f"CUDA unavailable: {exc}"
    if not DEFAULT_FATBIN.is_file():
        return f"{DEFAULT_FATBIN} missing (run `make kernels`)"
    return None


@pytest.fixture(scope="session")
def cuda_device():
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    from gpu_worker.backends.cuda.device import CudaDevice

    device = CudaDevice(0)
    # Not left current: other GPU tests (pycuda.autoinit) own their own context; ours is pushed
    # by the fixtures that use it (DeviceArrays, backends) and popped after.
    device.cuda.Context.pop()
    yield device
    device.context.push()
    device.close()


class DeviceArrays:
    """Upload/download numpy arrays through a child device (its memory freed after the test)."""

    def __init__(self, device) -> None:
        self.device = device.child()

    def upload(self, array: np.ndarray) -> DeviceTensor:
        array = np.ascontiguousarray(array)
        tensor = self.device.memory.tensor("test", array.shape, array.dtype)
        self.device.cuda.memcpy_htod(tensor.ptr, array)
        return tensor

    def poisoned(self, shape: tuple[int, ...], dtype) -> DeviceTensor:
        """Output buffer pre-filled with NaN (or -1 for integers): unwritten elements show."""
        fill = np.full(shape, np.nan if np.issubdtype(np.dtype(dtype), np.floating) else -1, dtype)
        return self.upload(fill)

    def download(self, tensor: DeviceTensor) -> np.ndarray:
        self.device.synchronize()
        out = np.empty(tensor.shape, tensor.dtype)
        self.device.cuda.memcpy_dtoh(out, tensor.ptr)
        return out

    def close(self) -> None:
        self.device.synchronize()
        self.device.memory.release()


@pytest.fixture
def gpu(cuda_device):
    with cuda_device.activate():
        arrays = DeviceArrays(cuda_device)
        yield arrays
        arrays.close()

