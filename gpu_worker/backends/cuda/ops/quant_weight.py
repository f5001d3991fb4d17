"""A GGUF weight resident on the device, kept in its file format (quantized or float).

Shared by the launchers of cuda/matvec.cu, cuda/embedding.cu and cuda/gemm.cu; pure Python (no
PyCUDA import), so plans and validation are testable without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.model.quant_types import quant_spec, type_name

# Every kernel treats a row as units of 8 values that share one scale (quant_formats.cuh).
VALUES_PER_UNIT = 8


def check_aligned_16(name: str, ptr: int) -> None:
    """The kernels read x and write embeddings with 16-byte vector accesses."""
    if int(ptr) <= 0 or int(ptr) % 16:
        raise ValueError(f"{name} must be a non-null 16-byte aligned device address, got {int(ptr):#x}")


class PreparedKernels:
    """Kernels of a loaded module (pycuda.driver.Module), fetched by name and prepared once with
    the argument signature all variants of one launcher share (PyCUDA `prepare` codes)."""

    def __init__(self, module: Any, arg_types: str) -> None:
        self._module, self._arg_types = module, arg_types
        self._functions: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._functions:
            function = self._module.get_function(name)
            function.prepare(self._arg_types)
            self._functions[name] = function
        return self._functions[name]


@dataclass(frozen=True)
class DeviceWeight:
    """Row-major [rows, cols] weight (rows = out features), each row whole blocks, rows packed.

    `ptr` is the device address of row 0 (int(DeviceAllocation)); the bytes are exactly as in
    the GGUF file, rows * row_bytes of them.
    """

    qtype: int
    rows: int
    cols: int
    ptr: int

    def __post_init__(self) -> None:
        spec = quant_spec(self.qtype)   # ValueError for an unsupported type
        if self.rows <= 0 or self.cols <= 0:
            raise ValueError(f"{spec.name} weight needs positive shape, got [{self.rows}, {self.cols}]")
        spec.row_nbytes(self.cols)      # ValueError unless cols is whole blocks
        if self.cols % VALUES_PER_UNIT:
            raise ValueError(f"{spec.name} weight cols must be a multiple of 8, got {self.cols}")
        if int(self.ptr) <= 0:
            raise ValueError("weight device pointer must be a non-null address")

    @property
    def row_bytes(self) -> int:
        return quant_spec(self.qtype).row_nbytes(self.cols)

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_bytes

    @property
    def kernel_suffix(self) -> str:
        """The lowercase type name used in kernel names: q4_k, q8_0, f16, bf16, ..."""
        return type_name(self.qtype).lower()
