"""Launcher for cuda/embedding.cu: out[T, K] fp32 = dequantize(table[ids[T], :]) for any type.

An id outside [0, vocab) produces a NaN row (the kernel cannot raise); callers validate ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import (
    VALUES_PER_UNIT,
    DeviceWeight,
    PreparedKernels,
    check_aligned_16,
)

MAX_THREADS = 256
MAX_GRID_X = 2**31 - 1


@dataclass(frozen=True)
class EmbeddingLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]


def plan_embedding(table: DeviceWeight, num_tokens: int) -> EmbeddingLaunch:
    if not 0 < num_tokens <= MAX_GRID_X:
        raise ValueError(f"embedding num_tokens must be in [1, {MAX_GRID_X}], got {num_tokens}")
    num_units = table.cols // VALUES_PER_UNIT
    threads = min(MAX_THREADS, 32 * -(-num_units // 32))
    return EmbeddingLaunch(f"embedding_{table.kernel_suffix}", (num_tokens, 1, 1), (threads, 1, 1))


class EmbeddingOp:
    """Launches embedding kernels from a loaded module (pycuda.driver.Module) on a given stream."""

    def __init__(self, module: Any) -> None:
        self._kernels = PreparedKernels(module, "PiiiPP")

    def __call__(self, table: DeviceWeight, ids_ptr: int, out_ptr: int, num_tokens: int, stream: Any) -> None:
        """ids_ptr: [num_tokens] int32, out_ptr: [num_tokens, table.cols] fp32 (device addresses)."""
        check_aligned_16("embedding out", out_ptr)
        plan = plan_embedding(table, num_tokens)
        self._kernels[plan.kernel_name].prepared_async_call(
            plan.grid, plan.block, stream,
            int(table.ptr), table.row_bytes, table.rows, table.cols, int(ids_ptr), int(out_ptr),
        )
