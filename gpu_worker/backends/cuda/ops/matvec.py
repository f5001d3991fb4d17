"""Launcher for cuda/matvec.cu: y[B, N] = x[B, K] @ W[N, K].T for decode-sized B, fp32 out.

The only place that checks matvec shapes and picks grid/block. Any B is accepted: the kernel
variant covers up to 8 batch rows per CTA and larger batches are split over grid.y, which
re-reads the weight (from L2 mostly) per 8 rows; the result of a row never depends on B.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight, check_aligned_16

BATCH_VARIANTS = (1, 2, 4, 8)       # MAX_B template instances: matvec_<type>_b<MAX_B>
MAX_ROWS_PER_CTA = 16
TILE_BUDGET_BYTES = 32 * 1024      # shared memory per CTA for the staged weight rows
MAX_SHARED_BYTES = 48 * 1024       # default dynamic shared-memory limit (no opt-in)
TARGET_CTAS = 264                  # about 2 CTAs per SM on a 132-SM H100: small N gets small tiles
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class MatvecLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    rows_per_cta: int


def plan_matvec(weight: DeviceWeight, batch: int) -> MatvecLaunch:
    """Grid, block and kernel for a batch of `batch` x rows; ValueError for shapes it cannot run."""
    if batch <= 0:
        raise ValueError(f"matvec batch must be positive, got {batch}")
    if -(-batch // BATCH_VARIANTS[-1]) > MAX_GRID_Y:
        raise ValueError(f"matvec batch {batch} exceeds {BATCH_VARIANTS[-1] * MAX_GRID_Y}")
    row_bytes = weight.row_bytes
    if row_bytes + 16 > MAX_SHARED_BYTES:
        raise ValueError(f"matvec row of {row_bytes} bytes exceeds the {MAX_SHARED_BYTES}-byte tile limit")
    spread_rows = -(-weight.rows // TARGET_CTAS)
    rows_per_cta = max(1, min(MAX_ROWS_PER_CTA, TILE_BUDGET_BYTES // row_bytes, max(4, spread_rows)))
    max_b = next(b for b in BATCH_VARIANTS if b >= min(batch, BATCH_VARIANTS[-1]))
    # 16 extra bytes: the tile is copied from the 16-byte boundary below its first row.
    shared_bytes = rows_per_cta * row_bytes + 16
    return MatvecLaunch(
        kernel_name=f"matvec_{weight.kernel_suffix}_b{max_b}",
        grid=(-(-weight.rows // rows_per_cta), -(-batch // max_b), 1),
        block=(32 * min(4, rows_per_cta), 1, 1),
        shared_bytes=shared_bytes,
        rows_per_cta=rows_per_cta,
    )


class MatvecOp:
    """Launches matvec kernels from a loaded module (pycuda.driver.Module) on a given stream."""

    def __init__(self, module: Any) -> None:
        self._module = module
        self._functions: dict[str, Any] = {}

    def _function(self, name: str) -> Any:
        if name not in self._functions:
            function = self._module.get_function(name)
            function.prepare("PiiiiPPi")
            self._functions[name] = function
        return self._functions[name]

    def __call__(self, weight: DeviceWeight, x_ptr: int, y_ptr: int, batch: int, stream: Any) -> None:
        """x_ptr: [batch, weight.cols] fp32, y_ptr: [batch, weight.rows] fp32 (device addresses)."""
        check_aligned_16("matvec x", x_ptr)
        plan = plan_matvec(weight, batch)
        self._function(plan.kernel_name).prepared_async_call(
            plan.grid, plan.block, stream,
            int(weight.ptr), weight.row_bytes, weight.rows, weight.cols, plan.rows_per_cta,
            int(x_ptr), int(y_ptr), batch,
            shared_size=plan.shared_bytes,
        )
