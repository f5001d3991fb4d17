"""CPU-side checks of the CUDA kernels: they compile (skipped without nvcc), every kernel name the
launchers can ask for exists, and the launchers' plans cover the shapes and reject bad ones."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from gpu_worker.backends.cuda.ops.embedding import plan_embedding
from gpu_worker.backends.cuda.ops import linear_mma
from gpu_worker.backends.cuda.ops.matvec import (
    BATCH_VARIANTS, KERNEL_PREFIXES, MAX_SHARED_BYTES, MatvecFusion, plan_matvec,
)
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.model.quant_types import SUPPORTED_TYPES, quant_spec

REPO = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc") or next(
    (p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
# (rows, cols) of every weight matrix in Qwen2.5-0.5B, and the LM head.
REAL_SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896)]


def weights_of_real_shapes():
    for qtype in SUPPORTED_TYPES:
        for rows, cols in REAL_SHAPES:
            if cols % quant_spec(qtype).block_elems == 0:
                yield DeviceWeight(int(qtype), rows, cols, ptr=1 << 20)


@pytest.fixture(scope="module")
def quant_kernel_entries(tmp_path_factory) -> set[str]:
    """Names of the __global__ entry points in matvec.cu, embedding.cu, linear_mma*.cu (sm_90 PTX)."""
    if NVCC is None:
        pytest.skip("nvcc not installed")
    out = tmp_path_factory.mktemp("ptx")
    source = out / "quant_kernels.cu"
    source.write_text("".join(f'#include "{REPO / "cuda" / n}"\n'
                             for n in ("matvec.cu", "embedding.cu", "linear_mma.cu", "linear_mma_gemm.cu",
                                       "linear_f16_gemm.cu")))
    ptx = out / "quant_kernels.ptx"
    subprocess.run([NVCC, "--ptx", "-arch=sm_90", "-O3", "-std=c++17", "-o", str(ptx), str(source)], check=True)
    return set(re.findall(r"\.entry\s+(\w+)\(", ptx.read_text()))


@needs_nvcc
def test_every_planned_kernel_exists(quant_kernel_entries):
    planned = set()
    for weight in weights_of_real_shapes():
        planned |= {plan_matvec(weight, batch, None, epilogue).kernel_name
                    for batch in (1, 2, 3, 8, 64) for epilogue in KERNEL_PREFIXES}
        planned.add(plan_embedding(weight, 4).kernel_name)
        planned |= {linear_mma.plan_linear(weight, tokens, epilogue).kernel_name
                    for tokens in (1, 8, 9, 32, 33, 4096) for epilogue in linear_mma.KERNEL_PREFIXES}
        planned |= {linear_mma.plan_linear(weight, 8, epilogue, tile).kernel_name
                    for tile in linear_mma.ALL_TILES for epilogue in linear_mma.KERNEL_PREFIXES
                    if linear_mma.tile_fits(weight, tile, 8)}
        planned.add(f"dequant_slots_{weight.kernel_suffix}")   # the f16gemm layout's W pass
    # the f16 layouts' kernels (per tile and epilogue) serve every type: W comes dequantized
    f16_tiles = sum(tile[0] in linear_mma.F16_LAYOUTS for tile in linear_mma.ALL_TILES)
    per_type = (len(KERNEL_PREFIXES) * len(BATCH_VARIANTS) + 2
                + len(linear_mma.KERNEL_PREFIXES) * (len(linear_mma.ALL_TILES) - f16_tiles))
    # F32 rows overflow the gemm layout's raw stages (its entry points exist but are never planned)
    assert len(planned) == (len(SUPPORTED_TYPES) * per_type - len(linear_mma.KERNEL_PREFIXES)
                            + f16_tiles * len(linear_mma.KERNEL_PREFIXES))
    assert {"f32_to_f16", "f32_to_f16_slots"} <= quant_kernel_entries
    assert planned <= quant_kernel_entries, sorted(planned - quant_kernel_entries)
    # the decode tiles' kernels with an RMSNorm prologue, wherever the whole K fits one stage
    normed = {linear_mma.plan_linear(weight, tokens, epilogue, tile, norm=True).kernel_name
              for weight in weights_of_real_shapes() for tokens in (1, 16) for epilogue in linear_mma.NORM_EPILOGUES
              for tile in linear_mma.NORM_TILES
              if weight.rows % 2 == 0 and linear_mma.tile_fits(weight, tile, tokens)
              and linear_mma.plan_k_chunks(weight, linear_mma.LAYOUTS[tile[0]][0], tokens) == weight.cols}
    assert normed and normed <= quant_kernel_entries, sorted(normed - quant_kernel_entries)


@needs_nvcc
@pytest.mark.slow
def test_make_kernels_builds_the_fatbin():
    if not (REPO / "cuda" / "all_kernels.cu").is_file():
        pytest.skip("cuda/all_kernels.cu (the fatbin's translation unit) not written yet")
    result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "kernels"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (REPO / "cuda" / "build" / "qwen_kernels.fatbin").stat().st_size > 0


def test_matvec_plan_covers_every_row_within_shared_memory():
    for weight in weights_of_real_shapes():
        for batch in (1, 5, 8, 9, 256):
            plan = plan_matvec(weight, batch)
            assert plan.grid[0] * plan.rows_per_cta >= weight.rows > (plan.grid[0] - 1) * plan.rows_per_cta
            max_b = int(plan.kernel_name.rsplit("_b", 1)[1])
            assert 1 <= plan.grid[1] <= -(-batch // max_b)    # every chunk has a CTA slice
            assert plan.rows_per_cta * weight.row_bytes + 16 == plan.shared_bytes <= MAX_SHARED_BYTES
            assert plan.block[0] <= 32 * plan.rows_per_cta    # no warp without a row
            warps = plan.block[0] // 32
            assert -(-plan.rows_per_cta // warps) <= 4        # kRowsPerWarp in matvec.cu


def test_swiglu_plans_give_each_warp_whole_gate_up_pairs():
    for weight in weights_of_real_shapes():
        for batch in (1, 8, 64):
            plan = plan_matvec(weight, batch, None, "swiglu")
            rows_per_warp = -(-plan.rows_per_cta // (plan.block[0] // 32))
            assert rows_per_warp in (2, 4) and plan.rows_per_cta % 2 == 0
    odd = DeviceWeight(8, 895, 896, ptr=1 << 20)
    with pytest.raises(ValueError):
        plan_matvec(odd, 1, None, "swiglu")
    with pytest.raises(ValueError):   # 10 rows over 4 warps would split a pair
        plan_matvec(DeviceWeight(8, 896, 896, ptr=1 << 20), 1, 10, "swiglu")


def test_matvec_fusion_validates():
    for bad in (dict(epilogue="gelu"), dict(norm_eps=0.0), dict(norm_weight_ptr=(1 << 20) + 4)):
        with pytest.raises(ValueError):
            MatvecFusion(**bad)


def test_linear_mma_plan_covers_rows_and_tokens_within_shared_memory():
    """Every real shape (and F32 rows too wide for one stage) at decode and prefill sizes, every
    tile: the grid covers every row and token, K chunks are whole blocks split evenly over the 4
    accumulators, and the staging buffers (or the final sums) fit the opted-in shared memory."""
    weights = list(weights_of_real_shapes()) + [DeviceWeight(0, 896, 32768, ptr=1 << 20)]
    for weight in weights:
        block = quant_spec(weight.qtype).block_elems
        for tokens in (1, 7, 8, 9, 32, 33, 64, 65, 512, 4096):
            for tile in (None, *linear_mma.ALL_TILES):
                if tile and not linear_mma.tile_fits(weight, tile, tokens):
                    assert weight.qtype == 0, "only wide F32 rows may not fit a tile"
                    continue
                plan = linear_mma.plan_linear(weight, tokens, tile=tile)
                layout, groups = tile or linear_mma.pick_tile(weight, tokens)
                rows_per_cta = linear_mma.LAYOUTS[layout][0]
                if layout in linear_mma.F16_LAYOUTS:   # fixed tiles; the launcher grids each row slice itself
                    assert plan.kernel_name.startswith(linear_mma.F16_LAYOUTS[layout])
                    assert plan.kernel_name.endswith(f"_g{groups}")
                    assert plan.grid[0] * rows_per_cta >= weight.rows and plan.grid[1] * 8 * groups >= tokens
                    assert plan.block == (256, 1, 1)
                    # 3 stages of swizzled tiles: 128 columns (256 bytes) of the CTA's W rows and tokens
                    assert plan.shared_bytes == 3 * (rows_per_cta + 8 * groups) * 256 <= linear_mma.SHARED_BUDGET
                    continue
                assert plan.kernel_name.startswith(linear_mma.KERNEL_LAYOUT_NAMES[layout])
                assert plan.kernel_name.endswith(f"_g{groups}")
                assert plan.grid[0] * rows_per_cta >= weight.rows > (plan.grid[0] - 1) * rows_per_cta
                assert plan.grid[1] * 8 * groups >= tokens > (plan.grid[1] - 1) * 8 * groups
                assert plan.x_rows == min(8 * groups, tokens)
                assert plan.shared_bytes <= linear_mma.SHARED_BUDGET
                if layout in linear_mma.GEMM_LAYOUTS:   # fixed 128-column chunks of an fp16 copy of x
                    assert plan.chunk_cols == linear_mma.GEMM_CHUNK_COLS == linear_mma.WARP_SPLIT_COLS
                    # 4 warps (one per accumulator) per warp tile of rows
                    assert plan.block == (128 * rows_per_cta // linear_mma.GEMM_WARP_ROWS[layout], 1, 1)
                    assert plan.shared_bytes == linear_mma.gemm_shared_bytes(weight, rows_per_cta, 8 * groups)
                    assert plan.shared_bytes <= linear_mma.SHARED_BUDGET
                    continue
                stage = linear_mma.stage_bytes(weight, plan.chunk_cols, rows_per_cta, plan.x_rows)
                if plan.chunk_cols < weight.cols:
                    assert plan.chunk_cols % linear_mma.WARP_SPLIT_COLS == 0 and plan.chunk_cols % block == 0
                    assert 2 * stage <= plan.shared_bytes and plan.chunk_stride % 16 == 0
                else:   # whole rows, copied flat
                    assert stage <= plan.shared_bytes and plan.chunk_stride == weight.row_bytes


def test_linear_mma_picks_the_measured_fastest_tiles():
    q, gate_up = DeviceWeight(8, 896, 896, ptr=1 << 20), DeviceWeight(8, 9728, 896, ptr=1 << 20)
    down, lm_head = DeviceWeight(14, 896, 4864, ptr=1 << 20), DeviceWeight(8, 151936, 896, ptr=1 << 20)
    k = DeviceWeight(6, 128, 896, ptr=1 << 20)
    assert [linear_mma.pick_tile(q, t) for t in (1, 8, 16, 17, 127, 128, 511, 512)] == \
        [("split_k", 1)] * 3 + [("split_k", 2)] * 2 + [("gemm16", 4)] * 2 + [("gemm", 8)]
    assert [linear_mma.pick_tile(k, t) for t in (1, 8, 9, 16, 17, 512, 4096)] == \
        [("narrow", 2)] * 2 + [("split_k", 1)] * 2 + [("split_k", 2)] * 3
    assert [linear_mma.pick_tile(gate_up, t) for t in (1, 16, 17, 63, 64, 255, 256, 512)] == \
        [("split_k", 1)] + [("split_k", 2)] * 3 + [("gemm32", 8), ("gemm32", 8), ("gemm", 8), ("gemm", 8)]
    assert [linear_mma.pick_tile(down, t) for t in (1, 8, 9, 16, 17, 64, 127, 128, 256, 511, 512)] == \
        [("narrow", 2)] * 2 + [("split_k", 1)] * 2 + [("split_k", 2)] * 3 + [("gemm16", 4)] * 3 + [("gemm", 8)]
    assert [linear_mma.pick_tile(lm_head, t) for t in (1, 31, 32, 64)] == \
        [("rows", 1), ("rows", 1), ("rows", 4), ("gemm", 8)]
    # without an fp16 scratch for x (allow_gemm=False) the next best of the other layouts
    assert linear_mma.pick_tile(gate_up, 512, allow_gemm=False) == ("split_k", 2)
    assert linear_mma.pick_tile(lm_head, 512, allow_gemm=False) == ("rows", 4)
    wide_f32 = DeviceWeight(0, 896, 32768, ptr=1 << 20)   # 64-row tiles do not fit: the next smaller
    assert linear_mma.pick_tile(wide_f32, 512) in {("gemm32", 8), ("split_k", 2), ("split_k", 1)}
    # with a weight scratch (allow_f16gemm): the f16 layouts from 32 tokens on; 64-row tiles from 512
    # on the 896-row matrices; never on k/v
    for weight, start, tile in ((q, 32, ("f16gemm32", 4)), (gate_up, 32, ("f16gemm", 8)),
                                (down, 32, ("f16gemm32", 4)), (lm_head, 32, ("f16gemm", 8))):
        assert linear_mma.pick_tile(weight, start, allow_f16gemm=True) == tile
        assert linear_mma.pick_tile(weight, start - 1, allow_f16gemm=True) == linear_mma.pick_tile(weight, start - 1)
    assert [linear_mma.pick_tile(w, t, allow_f16gemm=True) for w in (q, down) for t in (511, 512)] == \
        [("f16gemm32", 4), ("f16gemm", 8)] * 2
    assert all(linear_mma.pick_tile(k, t, allow_f16gemm=True) == linear_mma.pick_tile(k, t) for t in (128, 4096))
    f32_gate_up = DeviceWeight(0, 9728, 896, ptr=1 << 20)   # F32 raw rows overflow the gemm stages
    assert not linear_mma.tile_fits(f32_gate_up, ("gemm", 8), 512)
    assert linear_mma.pick_tile(f32_gate_up, 512) != ("gemm", 8)


def test_linear_mma_gemm_shared_bytes_mirror_the_kernel():
    """Two stages of (fp16 x tile of 64 tokens x 128 columns + 64 padding bytes per token, 64 raw
    W rows: the blocks a 128-column chunk overlaps, from the 16-byte boundary below, rounded)."""
    q5_0, q6_k, f16 = (DeviceWeight(t, 9728, 1024, ptr=1 << 20) for t in (6, 14, 1))
    assert linear_mma.gemm_raw_stride(q5_0) == 112      # 4 blocks x 22 bytes + 15 -> 112
    assert linear_mma.gemm_raw_stride(q6_k) == 240      # the whole 210-byte super-block
    assert linear_mma.gemm_raw_stride(f16) == 272       # 256 bytes + 15 -> 272
    assert linear_mma.gemm_shared_bytes(q6_k) == 2 * (64 * 320 + 64 * 240)
    assert linear_mma.gemm_shared_bytes(q6_k, 32) == 2 * (64 * 320 + 32 * 240)
    assert linear_mma.gemm_shared_bytes(q6_k, 16, 32) == 2 * (32 * 320 + 16 * 240)
    assert all(linear_mma.gemm_shared_bytes(w) <= linear_mma.SHARED_BUDGET for w in (q5_0, q6_k, f16))


def test_linear_mma_rejects_bad_shapes():
    q8 = DeviceWeight(8, 896, 896, ptr=1 << 20)
    for bad in (lambda: linear_mma.plan_linear(q8, 0), lambda: linear_mma.plan_linear(q8, 1, "gelu"),
                lambda: linear_mma.plan_linear(q8, 1, tile=("rows", 2)),
                lambda: linear_mma.plan_linear(DeviceWeight(0, 4, 48, ptr=1 << 20), 1),    # K % 32
                lambda: linear_mma.plan_linear(DeviceWeight(8, 7, 64, ptr=1 << 20), 1, "swiglu")):
        with pytest.raises(ValueError):
            bad()


@pytest.mark.parametrize("bad", [
    dict(qtype=10, rows=4, cols=256),     # Q2_K: not supported
    dict(qtype=8, rows=4, cols=48),       # Q8_0 needs whole 32-value blocks
    dict(qtype=12, rows=4, cols=896),     # Q4_K needs whole 256-value super-blocks
    dict(qtype=0, rows=0, cols=64),
    dict(qtype=0, rows=4, cols=12),       # not a multiple of 8
])
def test_device_weight_rejects_bad_shapes(bad):
    with pytest.raises(ValueError):
        DeviceWeight(ptr=1 << 20, **bad)


def test_launchers_reject_bad_batches_and_oversized_rows():
    q8 = DeviceWeight(8, 896, 896, ptr=1 << 20)
    for plan in (lambda: plan_matvec(q8, 0), lambda: plan_embedding(q8, 0)):
        with pytest.raises(ValueError):
            plan()
    with pytest.raises(ValueError):   # one F32 row of 32768 values is 128 KiB: larger than a tile
        plan_matvec(DeviceWeight(0, 16, 32768, ptr=1 << 20), 1)
