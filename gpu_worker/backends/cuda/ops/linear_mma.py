"""Launcher for cuda/linear_mma.cu: y[M, N] = x[M, K] @ W[N, K].T on tensor cores (fp16 operands,
fp32 sums) for any M, with an epilogue that stores, accumulates (y += W x) or applies SwiGLU to
interleaved gate/up rows.

The only place that checks these shapes and picks the CTA layout, the token tile, the K chunk and
the grid. None of those choices changes a result: a token's output depends only on (K, weight
type), so the same arithmetic serves decode steps and prefill chunks and batch invariance holds.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight, PreparedKernels, check_aligned_16
from gpu_worker.model.quant_types import quant_spec

KERNEL_PREFIXES = {"store": "", "accumulate": "acc_", "swiglu": "swiglu_"}
THREADS = 128
SUB_K = 32                          # columns per warp step; K must be a multiple
WARP_SPLIT_COLS = 4 * SUB_K         # a multi-chunk K chunk is a multiple of this (warp w owns sub-chunk c % 4 == w)
SHARED_BUDGET = 96 * 1024           # dynamic shared memory per CTA (fits sm_80 .. sm_90 opt-in limits)
MAX_GRID_Y = 65535
# CTA layouts -> (rows per CTA, token groups of 8 per CTA it is built for): in cuda/linear_mma.cu
# "split_k" (linear_mma_*): the 4 warps split K over 16 rows; "narrow" (linear_mma_narrow_*): the
# same over 8 rows x 16 tokens with the mma's operands swapped (half the dequantization per lane);
# "rows" (linear_mma_rows_*): each warp owns 16 of 64 rows; in cuda/linear_mma_gemm.cu "gemm" / "gemm32" / "gemm16"
# (linear_mma_gemm[32|16]_*): 64 / 32 / 16 rows x 64 / 64 / 32 tokens of an fp16 copy of x, warp w
# runs accumulator w % 4 over 32 / 32 / 16 rows.
# "f16gemm" / "f16gemm32" (cuda/linear_f16_gemm.cu): 64 / 32 rows x 64 (or 32) tokens of fp16
# copies of W (dequantized by a separate pass into a weight scratch, tall matrices in row slices)
# and of x, both in slot order.
LAYOUTS = {"split_k": (16, (1, 2, 4)), "narrow": (8, (2,)), "rows": (64, (1, 4)), "gemm": (64, (8,)), "gemm32": (32, (8,)),
           "gemm16": (16, (4,)), "f16gemm": (64, (8,)), "f16gemm32": (32, (4, 8))}
F16_LAYOUTS = {"f16gemm": "linear_f16_gemm", "f16gemm32": "linear_f16_gemm32"}   # layout -> kernel stem
F16_SLICE_ROWS = 64                 # row slices of the weight scratch: whole tiles of both f16 layouts
GEMM_WARP_ROWS = {"gemm": 32, "gemm32": 32, "gemm16": 16}   # GemmShape's WARP_ROWS
GEMM_LAYOUTS = tuple(GEMM_WARP_ROWS)
ALL_TILES = (("f16gemm", 8), ("f16gemm32", 8), ("f16gemm32", 4), ("gemm", 8), ("gemm32", 8), ("gemm16", 4),
             ("rows", 4), ("rows", 1), ("split_k", 4), ("split_k", 2), ("split_k", 1), ("narrow", 2))
GEMM_CHUNK_COLS = 128                                    # linear_mma_gemm.cu: kGemmChunkCols
GEMM_X_ROW_BYTES = 2 * GEMM_CHUNK_COLS + 64             # one token's fp16 x chunk + bank padding
CONVERT_THREADS = 256
F16_GEMM_THREADS = 256
F16_GEMM_STAGES = 3
F16_EPILOGUE_SUFFIXES = {"store": "", "accumulate": "_acc", "swiglu": "_swiglu"}
WIDE_ROWS = 16384                   # N from which a matrix counts as LM-head-like
# Where the gemm layouts are the measured fastest (H200, linear_mma_tiles_h200.md): on wide
# matrices (gate/up, LM head) from 64 tokens, 32-row tiles below 256 tokens; on 896-row ones
# (q, o, down) 16-row x 32-token tiles from 128 tokens (8x the CTAs of 32-row tiles), 64-row
# tiles from 512; never on k/v (128 rows).
GEMM_WIDE_ROWS, GEMM_WIDE_FROM_TOKENS, GEMM_WIDE_64_ROWS_FROM = 4096, 64, 256
GEMM_ROWS, GEMM_FROM_TOKENS, GEMM16_FROM_TOKENS = 512, 512, 128
# The f16 layouts (fp16 copies of W and x; linear_mma_tiles_h200.md): never on k/v (N < 512: split-K
# is 2x faster there); f16gemm on gate/up-like matrices (4096 <= N < 16384: 20.7 us against gemm32's
# 30.4 at 64 tokens) and on the LM head; on the 896-row ones 32-row x 32-token f16gemm32 tiles (4x
# the CTAs: each CTA's chain of chunks sets the time), f16gemm from 512. All from 32 tokens: decode
# graphs on an H200 (synthetic weights with the real model's types, session 12) at 24 / 32 / 48 / 64
# tokens took 2,394 / 2,397 / 2,125 / 2,137 us with them from 64 (gate/up, down) and 128 (q/o, LM
# head) tokens, 1,939 / 1,943 / 2,006 / 2,016 us from 32 (16 tokens: 1,708 us either way). From 16 tokens
# on, the 16-token graph got slower (1,678 -> 1,938 us, measured on another machine).
F16_GEMM_FROM_TOKENS, F16_GEMM_WIDE_FROM_TOKENS, F16_GEMM_NARROW_64_ROWS_FROM = 32, 32, 512
LONG_COLS = 4096                    # K from which a matrix counts as down-projection-like
# Decode sizes (linear_mma_tiles_h200.md, 2026-11-28 session 7): the narrow tile up to 8 tokens where a
# warp's chain is long (down: 13.3 -> 9.1 us at 1 token, 19.1 -> 13.6 at 8) or the rows few (k/v: 3.2
# -> 2.8); elsewhere 16-row split-K tiles of 8 tokens, on the narrower matrices also for 9-16 tokens (q/o
# 4.3 us against 4.6 for 16-token tiles, k/v 3.4 against 4.2, down 19.6 against 26.2; not gate/up: 18.9
# against 18.0); gate/up was slower narrow (8.4 -> 11.0 us at 1 token).
NARROW_UP_TO_TOKENS, SPLIT_K_8_UP_TO_TOKENS = 8, 16
# Decode tiles with an RMSNorm of x in front (linear_mma*_norm_* kernels): whole K staged at once
NORM_TILES, NORM_EPILOGUES = (("split_k", 1), ("narrow", 2)), ("store", "swiglu")
KERNEL_LAYOUT_NAMES = {"split_k": "linear_mma_", "narrow": "linear_mma_narrow_", "rows": "linear_mma_rows_",
                       "gemm": "linear_mma_gemm_", "gemm32": "linear_mma_gemm32_", "gemm16": "linear_mma_gemm16_"}


@dataclass(frozen=True)
class LinearLaunch:
    kernel_name: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    chunk_cols: int
    chunk_stride: int
    x_rows: int
    shared_bytes: int


@functools.lru_cache(maxsize=4096)
def pick_tile(weight: DeviceWeight, num_tokens: int, allow_gemm: bool = True,
              allow_f16gemm: bool = False) -> tuple[str, int]:
    """(layout, token groups) by the fastest measured on an H200 at the real shapes
    (docs/gpu_results/linear_mma_tiles_h200.md); every choice gives bitwise the same result.
    With scratches for fp16 copies of x and W (allow_f16gemm), on matrices of >= GEMM_ROWS rows:
    f16gemm from F16_GEMM_FROM_TOKENS (F16_GEMM_WIDE_FROM_TOKENS on gate/up-like ones); on the
    narrower ones f16gemm32 with 32-token tiles, f16gemm from 512.
    Else a gemm tile where wanted_gemm says so (and an fp16 scratch for x exists). Otherwise:
    LM-head-like (N >= 16384): 64-row tiles, 32 tokens per CTA from 32 tokens on. Others, up to 8
    tokens: narrow tiles (8 rows x 16 tokens) on long-K or short (< 512 rows) matrices, 16-row split-K
    tiles of 8 tokens on the rest, those also for 9-16 tokens below 4096 rows; 16-row split-K tiles of
    16 tokens beyond; from 256 tokens a long-K matrix (the down projection) takes 64-row tiles of 32
    tokens. A tile that does not fit the shared budget (wide F32 rows) falls back to the next smaller one."""
    if allow_f16gemm and weight.rows >= GEMM_WIDE_ROWS:
        gate_up_like = weight.rows < WIDE_ROWS
        if num_tokens >= (F16_GEMM_WIDE_FROM_TOKENS if gate_up_like else F16_GEMM_FROM_TOKENS):
            return "f16gemm", 8
    elif allow_f16gemm and weight.rows >= GEMM_ROWS:
        if num_tokens >= F16_GEMM_NARROW_64_ROWS_FROM:
            return "f16gemm", 8
        if num_tokens >= (F16_GEMM_WIDE_FROM_TOKENS if weight.cols >= LONG_COLS else F16_GEMM_FROM_TOKENS):
            return "f16gemm32", 4
    gemm = wanted_gemm(weight, num_tokens) if allow_gemm else None
    if gemm is not None and tile_fits(weight, gemm, num_tokens):
        wanted = [gemm]
    elif weight.rows >= WIDE_ROWS:
        wanted = [("rows", 4), ("rows", 1)] if num_tokens >= 32 else [("rows", 1)]
    elif num_tokens <= NARROW_UP_TO_TOKENS and (weight.cols >= LONG_COLS or weight.rows < GEMM_ROWS):
        wanted = [("narrow", 2), ("split_k", 1)]
    elif num_tokens <= 8 or (num_tokens <= SPLIT_K_8_UP_TO_TOKENS and weight.rows < GEMM_WIDE_ROWS):
        wanted = [("split_k", 1)]
    elif num_tokens >= 256 and weight.cols >= LONG_COLS:
        wanted = [("rows", 4), ("split_k", 2)]
    else:
        wanted = [("split_k", 2)]
    for tile in wanted + [("split_k", 1)]:
        if tile_fits(weight, tile, num_tokens):
            return tile
    return "split_k", 1


def wanted_gemm(weight: DeviceWeight, num_tokens: int) -> tuple[str, int] | None:
    """The gemm tile where one is the measured fastest (docs/gpu_results/linear_mma_tiles_h200.md)."""
    if weight.rows >= WIDE_ROWS:   # LM head
        return ("gemm", 8) if num_tokens >= GEMM_WIDE_FROM_TOKENS else None
    if weight.rows >= GEMM_WIDE_ROWS:
        if num_tokens < GEMM_WIDE_FROM_TOKENS:
            return None
        return ("gemm", 8) if num_tokens >= GEMM_WIDE_64_ROWS_FROM else ("gemm32", 8)
    if weight.rows < GEMM_ROWS:
        return None
    if num_tokens >= GEMM_FROM_TOKENS:
        return ("gemm", 8)
    if num_tokens >= GEMM16_FROM_TOKENS:
        return ("gemm16", 4)
    return None


def tile_fits(weight: DeviceWeight, tile: tuple[str, int], num_tokens: int) -> bool:
    """Whether the (layout, token groups) tile's staging fits the shared budget for this weight."""
    layout, groups = tile
    if layout in F16_LAYOUTS:
        return f16_shared_bytes(LAYOUTS[layout][0], 8 * groups) <= SHARED_BUDGET
    if layout in GEMM_LAYOUTS:
        return gemm_shared_bytes(weight, LAYOUTS[layout][0], 8 * groups) <= SHARED_BUDGET
    try:
        plan_k_chunks(weight, LAYOUTS[layout][0], min(8 * groups, num_tokens))
    except ValueError:
        return False
    return True


def f16_shared_bytes(rows_per_cta: int, tokens_per_cta: int) -> int:
    """linear_f16_gemm.cu: 3 stages of swizzled fp16 tiles, 128 columns of the CTA's W rows and tokens."""
    return F16_GEMM_STAGES * (rows_per_cta + tokens_per_cta) * 2 * GEMM_CHUNK_COLS


def gemm_raw_stride(weight: DeviceWeight) -> int:
    """linear_mma_gemm.cu: shared bytes of one W row's raw blocks for a 128-column chunk (whole
    blocks it overlaps, from the 16-byte boundary below, rounded up to 16)."""
    spec = quant_spec(weight.qtype)
    blocks = 1 if spec.block_elems >= GEMM_CHUNK_COLS else GEMM_CHUNK_COLS // spec.block_elems
    return (blocks * spec.block_bytes + 15 + 15) // 16 * 16


def gemm_shared_bytes(weight: DeviceWeight, rows_per_cta: int = 64, tokens_per_cta: int = 64) -> int:
    """linear_mma_gemm.cu: two stages of (fp16 x tile, rows_per_cta raw W rows)."""
    return 2 * (tokens_per_cta * GEMM_X_ROW_BYTES + rows_per_cta * gemm_raw_stride(weight))


def x_stride(chunk_cols: int) -> int:
    """Shared bytes of one token's x chunk (fp32 + 16 bytes of bank padding), as in linear_mma.cu."""
    return 4 * chunk_cols + 16


def stage_bytes(weight: DeviceWeight, chunk_cols: int, rows_per_cta: int, x_rows: int) -> int:
    """One staging buffer: the CTA's weight bytes (whole rows copied flat when chunk_cols covers K,
    else one padded slot per row chunk), then x_rows token chunks of x; as in linear_mma.cu."""
    if chunk_cols >= weight.cols:
        weight_bytes = (rows_per_cta * weight.row_bytes + 31) // 16 * 16
    else:
        weight_bytes = rows_per_cta * chunk_stride(weight, chunk_cols)
    return weight_bytes + x_rows * x_stride(chunk_cols)


def chunk_stride(weight: DeviceWeight, chunk_cols: int) -> int:
    """Shared bytes for one row's chunk: its bytes plus up to 15 before it (copied from the
    16-byte boundary below), rounded up to 16."""
    spec = quant_spec(weight.qtype)
    chunk_bytes = chunk_cols // spec.block_elems * spec.block_bytes
    return -(-(chunk_bytes + 15) // 16) * 16


def plan_k_chunks(weight: DeviceWeight, rows_per_cta: int, x_rows: int) -> int:
    """Columns per staged chunk: the whole row in one stage when it fits the budget, else the
    widest chunk (a multiple of 128 columns and of the block) whose two buffers fit."""
    if stage_bytes(weight, weight.cols, rows_per_cta, x_rows) <= SHARED_BUDGET:
        return weight.cols
    unit = _k_chunk_unit(weight)
    cols = unit
    while cols + unit < weight.cols and 2 * stage_bytes(weight, cols + unit, rows_per_cta, x_rows) <= SHARED_BUDGET:
        cols += unit
    if 2 * stage_bytes(weight, cols, rows_per_cta, x_rows) > SHARED_BUDGET:
        raise ValueError(f"linear_mma: a {unit}-column chunk of {weight.kernel_suffix} rows exceeds "
                         f"the {SHARED_BUDGET}-byte shared budget")
    return cols


def half_k_chunk(weight: DeviceWeight) -> int:
    """Decode steps on long-K matrices (the down projection) whose whole K would fit one stage (1-3
    tokens at the real shapes): K in two chunks instead, so that the second one loads while the first
    is multiplied. H200, synthetic real-shape weights, decode graph at 1 / 2 tokens: 885 -> 882 and
    992 -> 984 us; four chunks of 1280 columns were slower (927 / 1026 us)."""
    unit = _k_chunk_unit(weight)
    units = -(-weight.cols // unit)
    return -(-units // 2) * unit


def _k_chunk_unit(weight: DeviceWeight) -> int:
    """K chunks are multiples of 128 columns (the warps' sub-chunk split) and of the quant block."""
    block = quant_spec(weight.qtype).block_elems
    return WARP_SPLIT_COLS * block // _gcd(WARP_SPLIT_COLS, block)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


@functools.lru_cache(maxsize=4096)   # per launch on the host path; the arguments are all hashable
def plan_linear(weight: DeviceWeight, num_tokens: int, epilogue: str = "store",
                tile: tuple[str, int] | None = None, norm: bool = False) -> LinearLaunch:
    """Kernel, grid and shared memory; ValueError for shapes it cannot run. `tile` overrides the
    (layout, token groups) choice, for tests and benchmarks. norm: the kernel that RMSNorms x first
    (decode tiles with the whole K staged at once, store or SwiGLU epilogue)."""
    if epilogue not in KERNEL_PREFIXES:
        raise ValueError(f"linear_mma epilogue must be one of {sorted(KERNEL_PREFIXES)}, got {epilogue!r}")
    if num_tokens <= 0:
        raise ValueError(f"linear_mma num_tokens must be positive, got {num_tokens}")
    if weight.cols % SUB_K:
        raise ValueError(f"linear_mma needs cols a multiple of {SUB_K}, got {weight.cols}")
    if epilogue == "swiglu" and weight.rows % 2:
        raise ValueError(f"linear_mma swiglu needs interleaved gate/up rows (even count), got {weight.rows}")
    layout, groups = pick_tile(weight, num_tokens) if tile is None else tile
    if layout not in LAYOUTS or groups not in LAYOUTS[layout][1]:
        raise ValueError(f"linear_mma tile must be a layout of {LAYOUTS} with its groups, got {tile}")
    if norm and ((layout, groups) not in NORM_TILES or epilogue not in NORM_EPILOGUES):
        raise ValueError(f"linear_mma has an RMSNorm prologue only on the tiles {NORM_TILES} with epilogues "
                         f"{NORM_EPILOGUES}; got {(layout, groups)} {epilogue}")
    rows_per_cta, tokens_per_cta = LAYOUTS[layout][0], 8 * groups
    if -(-num_tokens // tokens_per_cta) > MAX_GRID_Y:
        raise ValueError(f"linear_mma num_tokens {num_tokens} exceeds {tokens_per_cta * MAX_GRID_Y}")
    x_rows = min(tokens_per_cta, num_tokens)
    grid = (-(-weight.rows // rows_per_cta), -(-num_tokens // tokens_per_cta), 1)
    if layout in F16_LAYOUTS:   # one kernel for every type (W comes dequantized); grids per row slice
        return LinearLaunch(kernel_name=f"{F16_LAYOUTS[layout]}{F16_EPILOGUE_SUFFIXES[epilogue]}_g{groups}",
                            grid=grid, block=(F16_GEMM_THREADS, 1, 1), chunk_cols=GEMM_CHUNK_COLS, chunk_stride=0,
                            x_rows=x_rows, shared_bytes=f16_shared_bytes(rows_per_cta, tokens_per_cta))
    name = f"{KERNEL_LAYOUT_NAMES[layout]}{KERNEL_PREFIXES[epilogue]}{weight.kernel_suffix}_g{groups}"
    if layout in GEMM_LAYOUTS:   # fixed 128-column chunks and strides; x is an fp16 copy
        if not tile_fits(weight, (layout, groups), num_tokens):
            raise ValueError(f"linear_mma {layout} tiles of {weight.kernel_suffix} rows exceed the shared budget")
        return LinearLaunch(kernel_name=name,
                            grid=grid, block=(128 * rows_per_cta // GEMM_WARP_ROWS[layout], 1, 1),
                            chunk_cols=GEMM_CHUNK_COLS, chunk_stride=0, x_rows=x_rows,
                            shared_bytes=gemm_shared_bytes(weight, rows_per_cta, tokens_per_cta))
    chunk_cols = plan_k_chunks(weight, rows_per_cta, x_rows)
    if not norm and layout in ("split_k", "narrow") and num_tokens <= NARROW_UP_TO_TOKENS \
            and weight.cols >= LONG_COLS and chunk_cols >= weight.cols:
        half = half_k_chunk(weight)
        if 2 * stage_bytes(weight, half, rows_per_cta, x_rows) <= SHARED_BUDGET:
            chunk_cols = half
    buffers = 1 if chunk_cols >= weight.cols else 2
    if norm:   # the prologue normalizes x once, before the first (only) chunk is multiplied
        if chunk_cols < weight.cols:
            raise ValueError(f"linear_mma's RMSNorm prologue needs the whole K staged at once; {layout} tiles "
                             f"of {weight.kernel_suffix} rows stage {chunk_cols} of {weight.cols} columns")
        name = f"{KERNEL_LAYOUT_NAMES[layout]}norm_{KERNEL_PREFIXES[epilogue]}{weight.kernel_suffix}_g{groups}"
    final_sums = 4 * rows_per_cta * tokens_per_cta * 4   # split_k: [warp][row][token]; rows: a quarter used
    staged = buffers * stage_bytes(weight, chunk_cols, rows_per_cta, x_rows)
    if norm:   # the RMSNorm gain, staged after the x rows
        staged += 4 * weight.cols
    return LinearLaunch(
        kernel_name=name,
        grid=grid,
        block=(THREADS, 1, 1),
        chunk_cols=chunk_cols,
        chunk_stride=weight.row_bytes if chunk_cols >= weight.cols else chunk_stride(weight, chunk_cols),
        x_rows=x_rows,
        shared_bytes=max(staged, final_sums),
    )


class LinearMmaOp:
    """Launches linear_mma kernels from a loaded module (pycuda.driver.Module) on a given stream.

    The gemm layouts multiply an fp16 copy of x: `fp16_scratch` = (device address, capacity in
    halves) of a buffer for it (f32_to_f16 or f32_to_f16_slots writes it before each launch). The
    f16gemm layout also needs `weight_scratch` (same form) for the dequantized W, at least 64 rows
    of it; taller matrices run in row slices that fit. Without a scratch, or when x does not fit
    it, the launcher picks among the other layouts."""

    def __init__(self, module: Any, fp16_scratch: tuple[int, int] = (0, 0),
                 weight_scratch: tuple[int, int] = (0, 0)) -> None:
        self._kernels = PreparedKernels(module, "PiiiiiiPPii")
        self._norm_kernels = PreparedKernels(module, "PiiiiiiPPiiPf")
        self._f16_gemms = PreparedKernels(module, "PPPiiiiPi")
        self._dequants = PreparedKernels(module, "PiiiP")
        self._convert = module.get_function("f32_to_f16")
        self._convert.prepare("PPq")
        self._convert_slots = module.get_function("f32_to_f16_slots")
        self._convert_slots.prepare("PPi")
        self._opted_in: set[str] = set()
        self._scratch_ptr, self._scratch_elems = fp16_scratch
        self._weight_scratch_ptr, self._weight_scratch_elems = weight_scratch
        # (x_ptr, num_tokens, cols, slot order, address) of the last fp16 copy of x: converted into
        # the scratch, or written by x's producer (note_x16)
        self._x16_holds: tuple | None = None
        self._x16_noted: tuple | None = None   # note_x16's promise, for the next call only

    def _opt_in(self, kernel: Any, name: str, shared_bytes: int) -> Any:
        if name not in self._opted_in:   # more than the default 48 KiB of dynamic shared memory
            import pycuda.driver as cuda

            kernel.set_attribute(cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                 max(SHARED_BUDGET, shared_bytes))
            self._opted_in.add(name)
        return kernel

    @property
    def scratch_sizes(self) -> tuple[int, int]:
        """(fp16 x scratch, weight scratch) capacities in halves: with the shapes, they fix every plan."""
        return self._scratch_elems, self._weight_scratch_elems

    def choose(self, weight: DeviceWeight, num_tokens: int) -> tuple[str, int]:
        """The tile pick_tile takes given this launcher's scratches."""
        return pick_tile(weight, num_tokens, allow_gemm=self.can_gemm(weight, num_tokens),
                         allow_f16gemm=self.can_f16gemm(weight, num_tokens))

    def can_run(self, weight: DeviceWeight, num_tokens: int, tile: tuple[str, int]) -> bool:
        """Whether this launcher (its scratches) can run `tile`."""
        if not tile_fits(weight, tile, num_tokens):
            return False
        if tile[0] in F16_LAYOUTS:
            return self.can_f16gemm(weight, num_tokens)
        return tile[0] not in GEMM_LAYOUTS or self.can_gemm(weight, num_tokens)

    def can_norm(self, weight: DeviceWeight, num_tokens: int, epilogue: str = "store") -> bool:
        """Whether the tile this launcher picks has a kernel with the RMSNorm prologue here."""
        try:
            plan_linear(weight, num_tokens, epilogue, self.choose(weight, num_tokens), norm=True)
        except ValueError:
            return False
        return True

    def can_gemm(self, weight: DeviceWeight, num_tokens: int) -> bool:
        return num_tokens * weight.cols <= self._scratch_elems

    def can_f16gemm(self, weight: DeviceWeight, num_tokens: int) -> bool:
        return self.can_gemm(weight, num_tokens) and self.slice_rows(weight) > 0

    def wants_x16(self, weight: DeviceWeight, num_tokens: int) -> bool:
        """Whether a call with this weight and token count multiplies an fp16 slot-order copy of x
        (an f16 layout), which x's producer may then write itself (note_x16)."""
        return self.choose(weight, num_tokens)[0] in F16_LAYOUTS

    def note_x16(self, x_ptr: int, num_tokens: int, cols: int, x16_ptr: int) -> None:
        """The caller has enqueued a write of x's fp16 slot-order copy at x16_ptr (rms_norm,
        attention or a SwiGLU epilogue, bitwise f32_to_f16_slots' values): the next call, if it
        multiplies this x in an f16 layout, reads that copy instead of converting x again."""
        self._x16_noted = (int(x_ptr), num_tokens, cols, True, int(x16_ptr))
        if self._x16_holds is not None and self._x16_holds[4] == int(x16_ptr):   # overwritten there
            self._x16_holds = None

    def slice_rows(self, weight: DeviceWeight) -> int:
        """Rows of W per f16gemm slice: what the weight scratch holds, in whole 64-row tiles."""
        return min(weight.rows, self._weight_scratch_elems // weight.cols // F16_SLICE_ROWS * F16_SLICE_ROWS)

    def __call__(self, weight: DeviceWeight, x_ptr: int, y_ptr: int, num_tokens: int, stream: Any,
                 epilogue: str = "store", tile: tuple[str, int] | None = None, x_unchanged: bool = False,
                 y_stride: int | None = None, norm: tuple[int, float] | None = None, y16_ptr: int = 0) -> None:
        """x_ptr: [num_tokens, weight.cols] fp32; y_ptr: [num_tokens, weight.rows] fp32, or
        [num_tokens, weight.rows / 2] for "swiglu" (device addresses), rows y_stride floats apart
        (default: packed) so that several launches can fill the columns of one buffer. x_unchanged:
        the caller promises x has not been written since the previous call (q, k and v share their
        input), so an fp16 copy of the same x in the same order is reused instead of converted again.
        norm = (gain device address, eps): x is RMSNormed first, as rms_norm.cu would (bitwise);
        only where can_norm says so (ValueError otherwise). y16_ptr ("swiglu" only): where the f16
        layouts also write y's fp16 slot-order copy (then noted, for the next call: the down
        projection); other layouts ignore it, and the next call converts y itself."""
        noted, self._x16_noted = self._x16_noted, None
        check_aligned_16("linear_mma x", x_ptr)
        outputs = weight.rows // 2 if epilogue == "swiglu" else weight.rows
        if y_stride is None:
            y_stride = outputs
        elif y_stride < outputs:
            raise ValueError(f"linear_mma y_stride must be >= the {outputs} outputs per row, got {y_stride}")
        if tile is None:
            tile = self.choose(weight, num_tokens)
        elif tile[0] in LAYOUTS and not self.can_run(weight, num_tokens, tile):
            raise ValueError(f"linear_mma cannot run tile {tile} here: it needs an fp16 scratch of "
                             f"{num_tokens * weight.cols} halves (has {self._scratch_elems}), f16gemm a weight "
                             f"scratch of {F16_SLICE_ROWS * weight.cols} (has {self._weight_scratch_elems})")
        plan = plan_linear(weight, num_tokens, epilogue, tile, norm=norm is not None)
        if tile[0] in F16_LAYOUTS or tile[0] in GEMM_LAYOUTS:
            self._convert_x(x_ptr, num_tokens, weight.cols, tile[0] in F16_LAYOUTS, x_unchanged, noted, stream)
        else:   # x_unchanged promises nothing about calls before this one: forget the copy
            self._x16_holds = None
        if tile[0] in F16_LAYOUTS:
            if epilogue != "swiglu" or y_stride != outputs or outputs % SUB_K:   # whole slot-order rows only
                y16_ptr = 0
            if y16_ptr and self._x16_holds[4] == y16_ptr:
                raise ValueError("linear_mma y16 must not be the buffer that holds x's fp16 copy")
            self._f16gemm(weight, y_ptr, num_tokens, stream, plan, LAYOUTS[tile[0]][0], y_stride,
                          epilogue == "swiglu", y16_ptr)
            if y16_ptr:
                self.note_x16(y_ptr, num_tokens, outputs, y16_ptr)
            return
        if tile[0] in GEMM_LAYOUTS:
            x_ptr = self._scratch_ptr
        args = (int(weight.ptr), weight.row_bytes, weight.rows, weight.cols, plan.chunk_cols, plan.chunk_stride,
                plan.x_rows, int(x_ptr), int(y_ptr), num_tokens, y_stride)
        if norm is not None:
            check_aligned_16("linear_mma norm weight", norm[0])
            args += (int(norm[0]), float(norm[1]))
        kernels = self._kernels if norm is None else self._norm_kernels
        kernel = self._opt_in(kernels[plan.kernel_name], plan.kernel_name, plan.shared_bytes)
        kernel.prepared_async_call(plan.grid, plan.block, stream, *args, shared_size=plan.shared_bytes)

    def _convert_x(self, x_ptr: int, num_tokens: int, cols: int, slots: bool, x_unchanged: bool,
                   noted: tuple | None, stream: Any) -> None:
        """x -> the fp16 scratch (slot order for f16gemm), unless it already holds this x or x's
        producer wrote the copy (noted)."""
        source = (int(x_ptr), num_tokens, cols, slots)
        if noted is not None and noted[:4] == source:
            self._x16_holds = noted
            return
        if x_unchanged and self._x16_holds is not None and self._x16_holds[:4] == source:
            return
        count = num_tokens * cols
        if slots:
            self._convert_slots.prepared_async_call((-(-count // (8 * CONVERT_THREADS)), 1), (CONVERT_THREADS, 1, 1),
                                                    stream, int(x_ptr), self._scratch_ptr, count // 8)
        else:
            blocks = min(-(-count // (8 * CONVERT_THREADS)), 4096)
            self._convert.prepared_async_call((blocks, 1), (CONVERT_THREADS, 1, 1), stream,
                                              int(x_ptr), self._scratch_ptr, count)
        self._x16_holds = (*source, self._scratch_ptr)

    def _f16gemm(self, weight: DeviceWeight, y_ptr: int, num_tokens: int, stream: Any,
                 plan: LinearLaunch, rows_per_tile: int, y_stride: int, swiglu: bool, y16_ptr: int) -> None:
        """Per row slice: W slice -> fp16 slots (weight scratch), then multiply by the x copy."""
        x16_ptr = self._x16_holds[4]
        outputs = weight.rows // 2 if swiglu else weight.rows
        dequant = self._dequants[f"dequant_slots_{weight.kernel_suffix}"]
        gemm = self._opt_in(self._f16_gemms[plan.kernel_name], plan.kernel_name, plan.shared_bytes)
        step = self.slice_rows(weight)
        for first in range(0, weight.rows, step):
            rows = min(step, weight.rows - first)
            units = rows * weight.cols // 8
            dequant.prepared_async_call((-(-units // CONVERT_THREADS), 1), (CONVERT_THREADS, 1, 1), stream,
                                        int(weight.ptr) + first * weight.row_bytes, weight.row_bytes, rows,
                                        weight.cols, self._weight_scratch_ptr)
            # a slice's outputs start at its first row (SwiGLU: its first gate/up pair; step is even)
            # (slot order needs sub-chunks of 32 outputs: a SwiGLU slice's first output is a multiple of 32)
            out_first = first // 2 if swiglu else first
            y16_first = int(y16_ptr) + 2 * out_first if y16_ptr else 0
            gemm.prepared_async_call((-(-rows // rows_per_tile), plan.grid[1], 1), plan.block, stream,
                                     self._weight_scratch_ptr, x16_ptr, int(y_ptr) + 4 * out_first, rows,
                                     weight.cols, num_tokens, y_stride, y16_first, outputs,
                                     shared_size=plan.shared_bytes)
