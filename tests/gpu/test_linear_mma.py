"""GPU checks of cuda/linear_mma.cu (the tensor-core linear layer) for every GGML type.

Its contract: fp16 operands (x as given, W after dequantization), fp32 sums. The oracle is gguf's
numpy dequantizer, rounded to fp16 the same way, multiplied in float64. Outputs are poisoned with
NaN before each launch, inputs are fresh random, and batch invariance (alone / batched / chunked /
every kernel variant) is checked bitwise.
"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from gpu_worker.backends.cuda.ops.linear_mma import ALL_TILES, LinearMmaOp
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.backends.cuda.weights import same_type_runs
from gpu_worker.model.dequant import as_q8_0
from gpu_worker.model.quant_types import quant_spec

from slot_order import assert_same_halves, slot_order_f16
from test_quant_kernels import (ALL_TYPES, Device, gpu, random_weight_bytes, rel_error,  # noqa: F401 (gpu: fixture)
                                upload_weight)

pytestmark = pytest.mark.gpu
# fp32 sums in another order than float64 over up to 4864 products of fp16 values
LINEAR_MMA_TOLERANCE = 1e-5


def linear_op(dev: Device, module, halves: int = 1 << 22, weight_halves: int = 1 << 19) -> LinearMmaOp:
    """The launcher with NaN-poisoned fp16 scratches for the gemm layouts' copy of x and the
    f16gemm layout's copy of W (1 << 19 halves: every test matrix in one slice)."""
    return LinearMmaOp(module, (dev.upload(np.full(halves, np.nan, np.float16)), halves),
                       (dev.upload(np.full(weight_halves, np.nan, np.float16)), weight_halves))


def fp16_values(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).astype(np.float64)


def linear_shapes(qtype: QType) -> list[tuple[int, int]]:
    # 130 rows: a partial row tile; 4864 columns: K staged in several chunks for wide types and
    # for 32-row tiles; 896 (not whole 256-value super-blocks) for the 32-value block types.
    shapes = [(130, 768), (48, 4864)]
    return shapes if quant_spec(qtype).block_elems == 256 else shapes + [(77, 896)]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_linear_mma_matches_reference_and_is_batch_invariant(gpu, qtype):
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng(400 + int(qtype))
    linear = linear_op(dev, module)
    tokens = 150
    for rows, cols in linear_shapes(qtype):
        weight, dense = upload_weight(dev, qtype, rows, cols, rng)
        x = rng.standard_normal((tokens, cols), dtype=np.float32)

        def run(x_part: np.ndarray, tile=None) -> np.ndarray:
            y_ptr = dev.poisoned((len(x_part), rows))
            linear(weight, dev.upload(x_part), y_ptr, len(x_part), stream, tile=tile)
            return dev.read(y_ptr, (len(x_part), rows), stream)

        y = run(x)
        assert not np.isnan(y).any(), "an output element was not written"
        error = rel_error(y, fp16_values(x) @ fp16_values(dense).T)
        print(f"{qtype.name} [{rows}, {cols}]: rel error {error:.2e} vs the fp16-operand reference")
        assert error <= LINEAR_MMA_TOLERANCE
        for tile in ALL_TILES:   # every layout and token tile, on the whole batch and on a lone token
            if not linear.can_run(weight, tokens, tile):   # wide F32 rows
                continue
            np.testing.assert_array_equal(run(x, tile), y, err_msg=f"tile {tile} differs")
            np.testing.assert_array_equal(run(x[[5]], tile), y[[5]], err_msg=f"M=1, tile {tile} differs")
        chunks = np.concatenate([run(x[:33]), run(x[33:40]), run(x[40:97]), run(x[97:])])
        np.testing.assert_array_equal(chunks, y, err_msg="split into chunks changed results")
        order = [7, 6, 5, 4, 3, 2, 1, 0, 149]
        np.testing.assert_array_equal(run(x[order]), y[order], err_msg="token order changed results")


EPILOGUE_TYPES = [QType.F16, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K]


@pytest.mark.parametrize("qtype", EPILOGUE_TYPES, ids=lambda t: t.name)
def test_linear_mma_epilogues_match_reference(gpu, qtype):
    """Residual accumulate (y += W x) and SwiGLU over interleaved gate/up rows, alone and batched."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng(500 + int(qtype))
    linear = linear_op(dev, module)
    rows, cols, tokens = 260, 512, 70
    weight, dense = upload_weight(dev, qtype, rows, cols, rng)
    # f16gemm in 64-row slices (64, 64, 64, 64, 4): each slice's outputs land at its own rows
    sliced = linear_op(dev, module, weight_halves=64 * cols + 100)
    assert sliced.slice_rows(weight) == 64
    x = (3.0 * rng.standard_normal((tokens, cols))).astype(np.float32)
    product = fp16_values(x) @ fp16_values(dense).T
    residual = rng.standard_normal((tokens, rows), dtype=np.float32)
    gate, up = product[:, 0::2], product[:, 1::2]
    with np.errstate(over="ignore"):
        silu = gate / (1 + np.exp(-gate))
    expected = {"accumulate": residual + product, "swiglu": silu * up}
    for epilogue, ref in expected.items():
        out_rows = rows // 2 if epilogue == "swiglu" else rows
        start = residual if epilogue == "accumulate" else np.full((tokens, out_rows), np.nan, np.float32)
        outs = []
        runs = [(list(range(tokens)), ("rows", 4)), (list(range(tokens)), ("split_k", 4)),
                ([4], None), ([9, 4, 1], ("rows", 1)), (list(range(tokens)), ("gemm", 8)),
                (list(range(tokens)), ("gemm32", 8)), (list(range(tokens)), ("gemm16", 4)),
                (list(range(tokens)), ("f16gemm", 8)), (list(range(tokens)), ("f16gemm32", 8)),
                (list(range(tokens)), ("f16gemm32", 4)), (list(range(tokens)), ("f16gemm", 8))]
        for i, (order, tile) in enumerate(runs):
            y_ptr = dev.upload(start[order])
            op = sliced if i == len(runs) - 1 else linear
            op(weight, dev.upload(x[order]), y_ptr, len(order), stream, epilogue=epilogue, tile=tile)
            outs.append(dev.read(y_ptr, (len(order), out_rows), stream))
        assert not np.isnan(outs[0]).any()
        assert rel_error(outs[0], ref) <= LINEAR_MMA_TOLERANCE, epilogue
        np.testing.assert_array_equal(outs[1], outs[0], err_msg=f"{epilogue}: the two layouts differ")
        np.testing.assert_array_equal(outs[2], outs[0][[4]], err_msg=f"{epilogue}: M=1 differs")
        np.testing.assert_array_equal(outs[3], outs[0][[9, 4, 1]], err_msg=f"{epilogue}: M=3 differs")
        np.testing.assert_array_equal(outs[4], outs[0], err_msg=f"{epilogue}: the gemm layout differs")
        np.testing.assert_array_equal(outs[5], outs[0], err_msg=f"{epilogue}: the gemm32 layout differs")
        np.testing.assert_array_equal(outs[6], outs[0], err_msg=f"{epilogue}: the gemm16 layout differs")
        np.testing.assert_array_equal(outs[7], outs[0], err_msg=f"{epilogue}: the f16gemm layout differs")
        np.testing.assert_array_equal(outs[8], outs[0], err_msg=f"{epilogue}: the f16gemm32 g8 layout differs")
        np.testing.assert_array_equal(outs[9], outs[0], err_msg=f"{epilogue}: the f16gemm32 g4 layout differs")
        np.testing.assert_array_equal(outs[10], outs[0], err_msg=f"{epilogue}: f16gemm in row slices differs")


@pytest.mark.parametrize("tile", [("f16gemm", 8), ("f16gemm32", 4)])
def test_swiglu_writes_the_fp16_slot_copy_the_down_projection_reads(gpu, tile):
    """y16: the f16 layouts' SwiGLU epilogue also writes y rounded to fp16 in slot order (bitwise
    f32_to_f16_slots of y), in 64-row slices too; the next call multiplies that copy."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng()
    rows, cols, tokens = 256, 512, 70
    gate_up, _ = upload_weight(dev, QType.Q8_0, rows, cols, rng)
    down, _ = upload_weight(dev, QType.Q8_0, 96, rows // 2, rng)   # K = 128: whole blocks of 32
    x = rng.standard_normal((tokens, cols), dtype=np.float32)
    for op in (linear_op(dev, module), linear_op(dev, module, weight_halves=64 * cols)):
        y_ptr, y16_ptr = dev.poisoned((tokens, rows // 2)), dev.upload(np.full((tokens, rows // 2), np.nan, np.float16))
        op(gate_up, dev.upload(x), y_ptr, tokens, stream, epilogue="swiglu", tile=tile, y16_ptr=y16_ptr)
        y = dev.read(y_ptr, (tokens, rows // 2), stream)
        y16 = np.empty((tokens, rows // 2), np.float16)
        drv.memcpy_dtoh(y16, y16_ptr)
        assert not np.isnan(y).any()
        assert_same_halves(y16, slot_order_f16(y), f"{tile}: the SwiGLU epilogue's fp16 copy")
        # the down projection reads that copy (no conversion) and gets the converted copy's bits
        out_noted, out_converted = dev.poisoned((tokens, 96)), dev.poisoned((tokens, 96))
        op(down, y_ptr, out_noted, tokens, stream, tile=("f16gemm32", 4))
        op(down, y_ptr, out_converted, tokens, stream, tile=("f16gemm32", 4))
        noted = dev.read(out_noted, (tokens, 96), stream)
        assert not np.isnan(noted).any()
        np.testing.assert_array_equal(noted, dev.read(out_converted, (tokens, 96), stream))



def test_linear_mma_reuses_the_fp16_copy_of_x_only_when_it_holds_that_x(gpu):
    """x_unchanged (q, k and v share their input) skips the conversion only when the scratch holds
    the same x in the same order; another x, or a natural-order copy for an f16gemm, is converted."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng(600)
    linear = linear_op(dev, module)
    tokens, cols = 200, 896
    w1, _ = upload_weight(dev, QType.Q5_0, 128, cols, rng)
    w2, _ = upload_weight(dev, QType.Q8_0, 96, cols, rng)
    x_a, x_b = (dev.upload(rng.standard_normal((tokens, cols), dtype=np.float32)) for _ in range(2))

    def run(weight, x_ptr, tile, unchanged=False) -> np.ndarray:
        y_ptr = dev.poisoned((tokens, weight.rows))
        linear(weight, x_ptr, y_ptr, tokens, stream, tile=tile, x_unchanged=unchanged)
        return dev.read(y_ptr, (tokens, weight.rows), stream)

    reference = run(w2, x_b, ("split_k", 2))
    for tile in (("f16gemm", 8), ("gemm", 8)):
        run(w1, x_a, tile)
        np.testing.assert_array_equal(run(w2, x_b, tile, unchanged=True), reference, err_msg=f"{tile}: another x")
        np.testing.assert_array_equal(run(w2, x_b, tile, unchanged=True), reference, err_msg=f"{tile}: reused")
    run(w1, x_b, ("gemm", 8))
    np.testing.assert_array_equal(run(w2, x_b, ("f16gemm", 8), unchanged=True), reference,
                                  err_msg="a natural-order copy served an f16gemm")


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_0], ids=lambda t: t.name)
def test_q8_0_encoding_of_q4_0_and_q5_0_rows_gives_the_same_bits(gpu, qtype):
    """weights.qkv_device_types stores Q4_0 / Q5_0 q and k as Q8_0 next to a Q8_0 v (one launch):
    every layout must give bitwise the outputs of the original encoding, at decode and prefill sizes."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng()
    linear = linear_op(dev, module)
    rows, cols = 160, 896
    raw = random_weight_bytes(qtype, rows, cols, rng)
    original = DeviceWeight(int(qtype), rows, cols, dev.upload(raw))
    q8 = DeviceWeight(int(QType.Q8_0), rows, cols, dev.upload(as_q8_0(qtype, raw)))
    for tokens in (1, 5, 150):
        x = dev.upload(rng.standard_normal((tokens, cols), dtype=np.float32))
        for tile in (None, *ALL_TILES):
            if tile is not None and not (linear.can_run(original, tokens, tile) and linear.can_run(q8, tokens, tile)):
                continue
            outs = []
            for weight in (original, q8):
                y = dev.poisoned((tokens, rows))
                linear(weight, x, y, tokens, stream, tile=tile)
                outs.append(dev.read(y, (tokens, rows), stream))
            assert not np.isnan(outs[0]).any()
            np.testing.assert_array_equal(outs[1], outs[0], err_msg=f"{tokens} tokens, tile {tile}")


@pytest.mark.parametrize("v_type", [QType.Q5_0, QType.Q8_0], ids=lambda t: t.name)
def test_merged_qkv_launches_give_the_separate_launches_bits(gpu, v_type):
    """q, k, v stored back to back and merged into same-type runs (weights.same_type_runs), each run
    written into its columns of one [tokens, q + k + v] buffer (y_stride), give bitwise the outputs
    of three separate launches, at decode and prefill sizes (every layout the launcher picks)."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng(700 + int(v_type))
    linear = linear_op(dev, module, halves=1 << 20, weight_halves=1 << 21)
    cols, shapes = 896, ((QType.Q5_0, 896), (QType.Q5_0, 128), (v_type, 128))
    raws = [random_weight_bytes(qtype, rows, cols, rng) for qtype, rows in shapes]
    base = dev.upload(np.concatenate([raw.reshape(-1) for raw in raws]))
    parts, offset = [], 0
    for (qtype, rows), raw in zip(shapes, raws):
        parts.append(DeviceWeight(int(qtype), rows, cols, base + offset))
        offset += raw.nbytes
    runs = same_type_runs(parts)
    assert len(runs) == (1 if v_type == QType.Q5_0 else 2)
    width = sum(rows for _, rows in shapes)
    for tokens in (1, 7, 160, 600):
        x = dev.upload(rng.standard_normal((tokens, cols), dtype=np.float32))
        separate = []
        for part in parts:
            y_ptr = dev.poisoned((tokens, part.rows))
            linear(part, x, y_ptr, tokens, stream)
            separate.append(dev.read(y_ptr, (tokens, part.rows), stream))
        merged_ptr, column = dev.poisoned((tokens, width)), 0
        for n, run in enumerate(runs):
            linear(run, x, merged_ptr + 4 * column, tokens, stream, x_unchanged=n > 0, y_stride=width)
            column += run.rows
        merged = dev.read(merged_ptr, (tokens, width), stream)
        assert not np.isnan(merged).any()
        np.testing.assert_array_equal(merged, np.concatenate(separate, axis=1), err_msg=f"{tokens} tokens")


@pytest.mark.parametrize("qtype", [QType.Q5_0, QType.Q8_0, QType.F16, QType.Q4_K], ids=lambda t: t.name)
def test_norm_prologue_gives_rms_norm_then_linear_bitwise(gpu, qtype):
    """The *_norm_* decode kernels RMSNorm the staged x themselves: bitwise rms_norm_f32 followed by
    the plain kernel of the same tile, for each decode tile, store and SwiGLU, 1 to 16 tokens."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng(800 + int(qtype))
    linear = linear_op(dev, module)
    rows, cols = 194, (896 if quant_spec(qtype).block_elems == 32 or qtype == QType.F16 else 1024)
    weight, _ = upload_weight(dev, qtype, rows, cols, rng)
    gain = dev.upload(rng.uniform(0.5, 2.0, cols).astype(np.float32))
    rms_norm = module.get_function("rms_norm_f32")
    eps = 1e-6
    for tokens in (1, 5, 16):
        x = rng.standard_normal((tokens, cols), dtype=np.float32) * 3
        x_ptr = dev.upload(x)
        normed = dev.poisoned((tokens, cols))
        rms_norm(np.uintp(0), np.uintp(x_ptr), np.uintp(gain), np.uintp(normed), np.uintp(0), np.uintp(0),
                 np.int32(cols), np.float32(eps), np.int32(0), block=(128, 1, 1), grid=(tokens, 1), stream=stream)
        for tile in (("split_k", 1), ("narrow", 2)):
            for epilogue in ("store", "swiglu"):
                width = rows // 2 if epilogue == "swiglu" else rows
                plain, folded = dev.poisoned((tokens, width)), dev.poisoned((tokens, width))
                linear(weight, normed, plain, tokens, stream, tile=tile, epilogue=epilogue)
                linear(weight, x_ptr, folded, tokens, stream, tile=tile, epilogue=epilogue, norm=(gain, eps))
                want = dev.read(plain, (tokens, width), stream)
                assert not np.isnan(want).any()
                np.testing.assert_array_equal(dev.read(folded, (tokens, width), stream), want,
                                              err_msg=f"{tile} {epilogue} {tokens} tokens")
