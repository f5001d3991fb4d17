"""Launcher for cuda/gemm.cu: y[M, N] = x[M, K] @ W[N, K].T on tensor cores (fp16 operands,
fp32 accumulation), for prefill and large batches.

A row's result does not depend on M or on how a prompt is split into chunks, but it differs
from matvec's fp32 result: the backend must route a given token kind (prefill vs decode) to
one kernel regardless of batch size, or batch invariance breaks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight, PreparedKernels, check_aligned_16

TILE_M_CHOICES = (64, 32)          # gemm_<type> and gemm_<type>_m32
MIN_CTAS_FOR_64 = 264              # about 2 CTAs per SM on a 132-SM H100; fewer -> 32-row tiles
TILE_N = 64
TILE_K = 32
THREADS = 128
MAX_GRID_Y = 65535


@dataclass(frozen=True)
class GemmLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    tile_m: int


def plan_gemm(weight: DeviceWeight, num_tokens: int, tile_m: int | None = None) -> GemmLaunch:
    """Kernel and grid; the M tile only changes speed, never a result. `tile_m` overrides it."""
    if num_tokens <= 0:
        raise ValueError(f"gemm num_tokens must be positive, got {num_tokens}")
    if weight.cols % TILE_K:
        raise ValueError(f"gemm needs cols a multiple of {TILE_K}, got {weight.cols}")
    num_n_tiles = -(-weight.rows // TILE_N)
    if tile_m is None:
        tile_m = 64 if num_n_tiles * -(-num_tokens // 64) >= MIN_CTAS_FOR_64 else 32
    if tile_m not in TILE_M_CHOICES:
        raise ValueError(f"gemm tile_m must be one of {TILE_M_CHOICES}, got {tile_m}")
    if -(-num_tokens // tile_m) > MAX_GRID_Y:
        raise ValueError(f"gemm num_tokens {num_tokens} exceeds {tile_m * MAX_GRID_Y}")
    name = f"gemm_{weight.kernel_suffix}" + ("" if tile_m == 64 else f"_m{tile_m}")
    return GemmLaunch(name, (num_n_tiles, -(-num_tokens // tile_m), 1), (THREADS, 1, 1), tile_m)


class GemmOp:
    """Launches GEMM kernels from a loaded module (pycuda.driver.Module) on a given stream."""

    def __init__(self, module: Any) -> None:
        self._kernels = PreparedKernels(module, "PiiiPPi")

    def __call__(self, weight: DeviceWeight, x_ptr: int, y_ptr: int, num_tokens: int, stream: Any,
                 tile_m: int | None = None) -> None:
        """x_ptr: [num_tokens, weight.cols] fp32, y_ptr: [num_tokens, weight.rows] fp32."""
        check_aligned_16("gemm x", x_ptr)
        plan = plan_gemm(weight, num_tokens, tile_m)
        self._kernels[plan.kernel_name].prepared_async_call(
            plan.grid, plan.block, stream,
            int(weight.ptr), weight.row_bytes, weight.rows, weight.cols, int(x_ptr), int(y_ptr), num_tokens,
        )
