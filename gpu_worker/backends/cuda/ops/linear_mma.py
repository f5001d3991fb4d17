"""Launcher for cuda/linear_mma.cu: y[M, N] = x[M, K] @ W[N, K].T on tensor cores (fp16 operands,
fp32 sums) for any M, with an epilogue that stores, accumulates (y += W x) or applies SwiGLU to
interleaved gate/up rows.

The only place that checks these shapes and picks the kernel variant, the K chunk and the grid.
None of those choices changes a result: a token's output depends only on (K, weight type), so one
kernel serves decode steps and prefill chunks alike and batch invariance holds.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight, PreparedKernels, check_aligned_16
from gpu_worker.model.quant_types import quant_spec

KERNEL_PREFIXES = {"store": "linear_mma_", "accumulate": "linear_mma_acc_", "swiglu": "linear_mma_swiglu_"}
THREADS = 128
SUB_K = 32                          # columns per warp step; K must be a multiple
WARP_SPLIT_COLS = 4 * SUB_K         # a multi-chunk K chunk is a multiple of this (warp w owns sub-chunk c % 4 == w)
SHARED_BUDGET = 96 * 1024           # dynamic shared memory per CTA (fits sm_80 .. sm_90 opt-in limits)
MAX_GRID_Y = 65535
# (token groups of 8, row tiles of 16) per CTA: _g<NG>_r<R> kernels, picked by the token count.
SHAPES = ((1, 1), (4, 1), (8, 2))


@dataclass(frozen=True)
class LinearLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    chunk_cols: int
    chunk_stride: int
    shared_bytes: int


def pick_shape(num_tokens: int) -> tuple[int, int]:
    """Fewest token groups that cover a decode batch; past 32 tokens, 64-token tiles of 32 rows
    (each x fragment feeds two m-tiles, halving x traffic per weight byte)."""
    for groups, row_tiles in SHAPES:
        if num_tokens <= 8 * groups:
            return groups, row_tiles
    return SHAPES[-1]


def chunk_stride(weight: DeviceWeight, chunk_cols: int) -> int:
    """Shared bytes for one row's chunk: its bytes plus up to 15 before it (copied from the
    16-byte boundary below), rounded up to 16."""
    spec = quant_spec(weight.qtype)
    chunk_bytes = chunk_cols // spec.block_elems * spec.block_bytes
    return -(-(chunk_bytes + 15) // 16) * 16


def plan_k_chunks(weight: DeviceWeight, rows_per_cta: int) -> tuple[int, int]:
    """(chunk_cols, chunk_stride): the whole row in one stage when it fits the budget, else the
    widest chunk (a multiple of 128 columns and of the block) whose two buffers fit."""
    if rows_per_cta * chunk_stride(weight, weight.cols) <= SHARED_BUDGET:
        return weight.cols, chunk_stride(weight, weight.cols)
    block = quant_spec(weight.qtype).block_elems
    unit = WARP_SPLIT_COLS * block // _gcd(WARP_SPLIT_COLS, block)
    cols = unit
    while cols + unit < weight.cols and 2 * rows_per_cta * chunk_stride(weight, cols + unit) <= SHARED_BUDGET:
        cols += unit
    if 2 * rows_per_cta * chunk_stride(weight, cols) > SHARED_BUDGET:
        raise ValueError(f"linear_mma: a {unit}-column chunk of {weight.kernel_suffix} rows exceeds "
                         f"the {SHARED_BUDGET}-byte shared budget")
    return cols, chunk_stride(weight, cols)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def plan_linear(weight: DeviceWeight, num_tokens: int, epilogue: str = "store",
                shape: tuple[int, int] | None = None) -> LinearLaunch:
    """Kernel, grid and shared memory; ValueError for shapes it cannot run. `shape` overrides the
    (token groups, row tiles) variant, for tests and benchmarks."""
    if epilogue not in KERNEL_PREFIXES:
        raise ValueError(f"linear_mma epilogue must be one of {sorted(KERNEL_PREFIXES)}, got {epilogue!r}")
    if num_tokens <= 0:
        raise ValueError(f"linear_mma num_tokens must be positive, got {num_tokens}")
    if weight.cols % SUB_K:
        raise ValueError(f"linear_mma needs cols a multiple of {SUB_K}, got {weight.cols}")
    if epilogue == "swiglu" and weight.rows % 2:
        raise ValueError(f"linear_mma swiglu needs interleaved gate/up rows (even count), got {weight.rows}")
    groups, row_tiles = shape if shape is not None else pick_shape(num_tokens)
    if (groups, row_tiles) not in SHAPES:
        raise ValueError(f"linear_mma shape must be one of {SHAPES}, got {(groups, row_tiles)}")
    rows_per_cta, tokens_per_cta = 16 * row_tiles, 8 * groups
    if -(-num_tokens // tokens_per_cta) > MAX_GRID_Y:
        raise ValueError(f"linear_mma num_tokens {num_tokens} exceeds {tokens_per_cta * MAX_GRID_Y}")
    chunk_cols, stride = plan_k_chunks(weight, rows_per_cta)
    buffers = 1 if chunk_cols >= weight.cols else 2
    partial_sums = 4 * rows_per_cta * tokens_per_cta * 4   # [warp][row][token] fp32 after the K loop
    return LinearLaunch(
        kernel_name=f"{KERNEL_PREFIXES[epilogue]}{weight.kernel_suffix}_g{groups}_r{row_tiles}",
        grid=(-(-weight.rows // rows_per_cta), -(-num_tokens // tokens_per_cta), 1),
        block=(THREADS, 1, 1),
        chunk_cols=chunk_cols,
        chunk_stride=stride,
        shared_bytes=max(buffers * rows_per_cta * stride, partial_sums),
    )


class LinearMmaOp:
    """Launches linear_mma kernels from a loaded module (pycuda.driver.Module) on a given stream."""

    def __init__(self, module: Any) -> None:
        self._kernels = PreparedKernels(module, "PiiiiiPPi")
        self._opted_in: set[str] = set()

    def _kernel(self, name: str) -> Any:
        kernel = self._kernels[name]
        if name not in self._opted_in:   # more than the default 48 KiB of dynamic shared memory
            import pycuda.driver as cuda

            kernel.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, SHARED_BUDGET)
            self._opted_in.add(name)
        return kernel

    def __call__(self, weight: DeviceWeight, x_ptr: int, y_ptr: int, num_tokens: int, stream: Any,
                 epilogue: str = "store", shape: tuple[int, int] | None = None) -> None:
        """x_ptr: [num_tokens, weight.cols] fp32; y_ptr: [num_tokens, weight.rows] fp32, or
        [num_tokens, weight.rows / 2] for "swiglu" (device addresses)."""
        check_aligned_16("linear_mma x", x_ptr)
        plan = plan_linear(weight, num_tokens, epilogue, shape)
        self._kernel(plan.kernel_name).prepared_async_call(
            plan.grid, plan.block, stream,
            int(weight.ptr), weight.row_bytes, weight.rows, weight.cols, plan.chunk_cols, plan.chunk_stride,
            int(x_ptr), int(y_ptr), num_tokens,
            shared_size=plan.shared_bytes,
        )
