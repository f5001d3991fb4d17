"""Launcher for cuda/matvec.cu: y[B, N] = x[B, K] @ W[N, K].T for decode-sized B, fp32 out.

Optional fusions (MatvecFusion): RMSNorm of x first, and an epilogue that stores y, accumulates
into y (the residual stream: y += W x), or applies SwiGLU to interleaved gate/up rows.

The only place that checks matvec shapes and picks grid/block. Any B is accepted: a CTA stages
its weight rows once and loops over batch chunks of up to 8 rows; grid.y splits the chunks only
as far as needed to fill the GPU. The result of a row never depends on B or on the launch shape.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight, PreparedKernels, check_aligned_16

BATCH_VARIANTS = (1, 4, 8)          # MAX_B template instances: matvec_<type>_b<MAX_B>
WARPS_PER_CTA = 4
MAX_ROWS_PER_CTA = 16              # kRowsPerWarp (4) x WARPS_PER_CTA in matvec.cu
TILE_BUDGET_BYTES = 32 * 1024      # shared memory per CTA for the staged weight rows
MAX_SHARED_BYTES = 48 * 1024       # default dynamic shared-memory limit (no opt-in)
MIN_CTAS_BATCH_1 = 600
MIN_CTAS_BATCHED = 112
CTAS_TO_FILL = 528                 # 4 per SM on a 132-SM H100
MAX_BATCH = 1 << 16


KERNEL_PREFIXES = {"store": "matvec_", "accumulate": "matvec_acc_", "swiglu": "matvec_swiglu_"}


@dataclass(frozen=True)
class MatvecFusion:
    """What runs around the product. "swiglu" needs W's rows interleaved [gate_0, up_0, gate_1,
    up_1, ...] and writes y[B, N / 2] = silu(gate) * up; "accumulate" adds into y's values."""

    epilogue: str = "store"
    norm_weight_ptr: int = 0     # device [K] fp32 RMSNorm gain applied to x first; 0 = no norm
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.epilogue not in KERNEL_PREFIXES:
            raise ValueError(f"matvec epilogue must be one of {sorted(KERNEL_PREFIXES)}, got {self.epilogue!r}")
        if self.norm_weight_ptr:
            check_aligned_16("matvec norm weight", self.norm_weight_ptr)
        if not self.norm_eps > 0.0:
            raise ValueError(f"matvec norm_eps must be positive, got {self.norm_eps}")


NO_FUSION = MatvecFusion()


@dataclass(frozen=True)
class MatvecLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_bytes: int
    rows_per_cta: int


def default_rows_per_cta(weight: DeviceWeight, batch: int, epilogue: str = "store") -> int:
    """Rows staged per CTA (any value gives bitwise the same results). Larger tiles share each x
    load over more rows (up to 4 per warp), smaller ones put more CTAs in flight; measured on an
    H200 (docs/gpu_results/quant_kernels.md): batch 1 wants >= ~600 CTAs, batch > 1 >= ~112."""
    min_ctas = MIN_CTAS_BATCH_1 if batch == 1 else MIN_CTAS_BATCHED
    fitting = max(1, min(MAX_ROWS_PER_CTA, TILE_BUDGET_BYTES // weight.row_bytes))
    for rows_per_cta in (16, 8, 4):
        if rows_per_cta <= fitting and -(-weight.rows // rows_per_cta) >= min_ctas:
            return rows_per_cta
    if epilogue == "swiglu":           # whole gate/up pairs per warp: an even count
        return max(2, min(4, fitting) // 2 * 2)
    return min(4, fitting)


def warps_for(rows_per_cta: int, epilogue: str) -> int:
    """Warps per CTA; SwiGLU warps own 2 or 4 rows (whole pairs), others 1 to 4."""
    if epilogue == "swiglu":
        warps = min(WARPS_PER_CTA, max(1, rows_per_cta // 2))
        if rows_per_cta % (2 * warps):
            raise ValueError(f"matvec swiglu needs rows_per_cta in 2, 4, 6, 8, 16; got {rows_per_cta}")
        return warps
    return min(WARPS_PER_CTA, rows_per_cta)


def plan_matvec(weight: DeviceWeight, batch: int, rows_per_cta: int | None = None,
                epilogue: str = "store") -> MatvecLaunch:
    """Grid, block and kernel for a batch of `batch` x rows; ValueError for shapes it cannot run.
    `rows_per_cta` overrides the default tiling (for benchmarks and tests)."""
    if epilogue not in KERNEL_PREFIXES:
        raise ValueError(f"matvec epilogue must be one of {sorted(KERNEL_PREFIXES)}, got {epilogue!r}")
    if epilogue == "swiglu" and weight.rows % 2:
        raise ValueError(f"matvec swiglu needs interleaved gate/up rows (even count), got {weight.rows}")
    if batch <= 0:
        raise ValueError(f"matvec batch must be positive, got {batch}")
    if batch > MAX_BATCH:
        raise ValueError(f"matvec batch {batch} exceeds {MAX_BATCH}")
    row_bytes = weight.row_bytes
    if row_bytes + 16 > MAX_SHARED_BYTES:
        raise ValueError(f"matvec row of {row_bytes} bytes exceeds the {MAX_SHARED_BYTES}-byte tile limit")
    if rows_per_cta is None:
        rows_per_cta = default_rows_per_cta(weight, batch, epilogue)
    if not 1 <= rows_per_cta <= MAX_ROWS_PER_CTA:
        raise ValueError(f"matvec rows_per_cta must be in [1, {MAX_ROWS_PER_CTA}], got {rows_per_cta}")
    max_b = next(b for b in BATCH_VARIANTS if b >= min(batch, BATCH_VARIANTS[-1]))
    # 16 extra bytes: the tile is copied from the 16-byte boundary below its first row.
    shared_bytes = rows_per_cta * row_bytes + 16
    if shared_bytes > MAX_SHARED_BYTES:
        raise ValueError(f"matvec tile of {rows_per_cta} rows x {row_bytes} bytes exceeds {MAX_SHARED_BYTES}")
    num_row_tiles = -(-weight.rows // rows_per_cta)
    num_chunks = -(-batch // max_b)
    # Split batch chunks over grid.y only to reach CTAS_TO_FILL: each slice re-reads the weight.
    grid_y = max(1, min(num_chunks, -(-CTAS_TO_FILL // num_row_tiles)))
    return MatvecLaunch(
        kernel_name=f"{KERNEL_PREFIXES[epilogue]}{weight.kernel_suffix}_b{max_b}",
        grid=(num_row_tiles, grid_y, 1),
        block=(32 * warps_for(rows_per_cta, epilogue), 1, 1),   # <= 4 rows per warp
        shared_bytes=shared_bytes,
        rows_per_cta=rows_per_cta,
    )


class MatvecOp:
    """Launches matvec kernels from a loaded module (pycuda.driver.Module) on a given stream."""

    def __init__(self, module: Any) -> None:
        self._kernels = PreparedKernels(module, "PiiiiPPiPf")

    def __call__(self, weight: DeviceWeight, x_ptr: int, y_ptr: int, batch: int, stream: Any,
                 rows_per_cta: int | None = None, fusion: MatvecFusion = NO_FUSION) -> None:
        """x_ptr: [batch, weight.cols] fp32; y_ptr: [batch, weight.rows] fp32, or
        [batch, weight.rows / 2] for "swiglu" (device addresses)."""
        check_aligned_16("matvec x", x_ptr)
        plan = plan_matvec(weight, batch, rows_per_cta, fusion.epilogue)
        self._kernels[plan.kernel_name].prepared_async_call(
            plan.grid, plan.block, stream,
            int(weight.ptr), weight.row_bytes, weight.rows, weight.cols, plan.rows_per_cta,
            int(x_ptr), int(y_ptr), batch, int(fusion.norm_weight_ptr), float(fusion.norm_eps),
            shared_size=plan.shared_bytes,
        )
