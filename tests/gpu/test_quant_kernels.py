"""GPU checks of cuda/matvec.cu and cuda/embedding.cu (linear_mma*.cu: test_linear_mma.py) against gguf's numpy dequantizer.

Every supported GGML type, fresh random valid blocks, outputs poisoned with NaN before each launch.
Batch invariance is checked bitwise. Skipped cleanly without PyCUDA or a GPU.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf.quants import dequantize

from gpu_worker.backends.cuda.ops.embedding import EmbeddingOp
from gpu_worker.backends.cuda.ops.matvec import MAX_ROWS_PER_CTA, MAX_SHARED_BYTES, MatvecFusion, MatvecOp
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.model.quant_types import SUPPORTED_TYPES, quant_spec

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
FATBIN = REPO / "cuda" / "build" / "qwen_kernels.fatbin"
OWN_SOURCES = ("matvec.cu", "embedding.cu", "linear_mma.cu", "linear_mma_gemm.cu", "linear_f16_gemm.cu",
               "rms_norm.cu")
ALL_TYPES = sorted(SUPPORTED_TYPES, key=int)
# Byte offsets of the fp16 scale/min fields in each block; random bytes there could be inf/NaN.
HALF_FIELD_OFFSETS = {
    QType.Q4_0: (0,), QType.Q4_1: (0, 2), QType.Q5_0: (0,), QType.Q5_1: (0, 2), QType.Q8_0: (0,),
    QType.Q4_K: (0, 2), QType.Q5_K: (0, 2), QType.Q6_K: (208,),
}
MATVEC_TOLERANCE = 1e-5   # fp32 products and fp32 accumulation


def random_weight_bytes(qtype: QType, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """[rows, row_bytes] uint8 of valid random blocks: random quants, sane finite fp16 scales."""
    if qtype == QType.F32:
        return rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint8)
    if qtype == QType.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8)
    if qtype == QType.BF16:
        bits = rng.standard_normal((rows, cols), dtype=np.float32).view(np.uint32) >> 16
        return bits.astype(np.uint16).view(np.uint8)
    spec = quant_spec(qtype)
    num_blocks = rows * cols // spec.block_elems
    blocks = rng.integers(0, 256, size=(num_blocks, spec.block_bytes), dtype=np.uint8)
    for offset in HALF_FIELD_OFFSETS[qtype]:
        scales = rng.uniform(0.002, 0.02, num_blocks) * rng.choice([-1.0, 1.0], num_blocks)
        blocks[:, offset:offset + 2] = scales.astype(np.float16).view(np.uint8).reshape(num_blocks, 2)
    return blocks.reshape(rows, -1)


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(out.astype(np.float64) - ref) / np.linalg.norm(ref))


def compile_own_module(drv, out_dir: Path):
    """Builds this file's three kernels into one cubin for the present card (used when the
    project fatbin has not been built)."""
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    major, minor = drv.Context.get_device().compute_capability()
    source = out_dir / "quant_kernels.cu"
    source.write_text("".join(f'#include "{REPO / "cuda" / name}"\n' for name in OWN_SOURCES))
    cubin = out_dir / "quant_kernels.cubin"
    subprocess.run([nvcc, "--cubin", f"-arch=sm_{major}{minor}", "-O3", "-std=c++17",
                    "-o", str(cubin), str(source)], check=True)
    return drv.module_from_file(str(cubin))


def load_quant_module(drv, out_dir: Path):
    """The project fatbin when it is newer than every kernel source, else a fresh own build."""
    sources = list((REPO / "cuda").glob("*.cu")) + list((REPO / "cuda").glob("*.cuh"))
    if FATBIN.is_file() and FATBIN.stat().st_mtime >= max(p.stat().st_mtime for p in sources):
        module = drv.module_from_file(str(FATBIN))
        try:
            module.get_function("matvec_q8_0_b1")
            return module
        except drv.LogicError:
            pass
    return compile_own_module(drv, out_dir)


@pytest.fixture(scope="module")
def gpu(tmp_path_factory):
    """(pycuda.driver, module, stream); skips without PyCUDA or a device."""
    drv = pytest.importorskip("pycuda.driver")
    try:
        import pycuda.autoinit  # noqa: F401  (creates the context on device 0)
    except Exception as error:  # no driver / no device
        pytest.skip(f"no usable CUDA device: {error}")
    return drv, load_quant_module(drv, tmp_path_factory.mktemp("cubin")), drv.Stream()


class Device:
    """Tiny helpers that upload arrays and read back NaN-poisoned outputs."""

    def __init__(self, drv) -> None:
        self.drv = drv
        self.keep: list = []

    def upload(self, array: np.ndarray) -> int:
        allocation = self.drv.to_device(np.ascontiguousarray(array))
        self.keep.append(allocation)
        return int(allocation)

    def poisoned(self, shape: tuple[int, ...]) -> int:
        return self.upload(np.full(shape, np.nan, dtype=np.float32))

    def read(self, ptr: int, shape: tuple[int, ...], stream) -> np.ndarray:
        stream.synchronize()
        out = np.empty(shape, dtype=np.float32)
        self.drv.memcpy_dtoh(out, ptr)
        return out


def upload_weight(dev: Device, qtype: QType, rows: int, cols: int, rng) -> tuple[DeviceWeight, np.ndarray]:
    raw = random_weight_bytes(qtype, rows, cols, rng)
    dense = dequantize(raw, qtype).astype(np.float64)   # the independent oracle, [rows, cols]
    assert np.isfinite(dense).all()
    return DeviceWeight(int(qtype), rows, cols, dev.upload(raw)), dense


def matvec_shapes(qtype: QType) -> list[tuple[int, int]]:
    # 130 rows: a partial last tile; 768 cols: 3 units per lane; 2000 rows: at B=70 a CTA loops
    # over several batch chunks; 896 (the model's hidden size) is not a whole number of 256-value
    # super-blocks, so K-quants skip it.
    shapes = [(130, 768), (2000, 512)]
    return shapes if quant_spec(qtype).block_elems == 256 else shapes + [(77, 896)]


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_matvec_matches_reference_and_is_batch_invariant(gpu, qtype):
    drv, module, stream = gpu
    dev, rng, matvec = Device(drv), np.random.default_rng(int(qtype)), MatvecOp(module)
    for rows, cols in matvec_shapes(qtype):
        weight, dense = upload_weight(dev, qtype, rows, cols, rng)
        x = rng.standard_normal((70, cols), dtype=np.float32)
        y_ptr = dev.poisoned((70, rows))
        matvec(weight, dev.upload(x), y_ptr, 70, stream)        # 9 chunks of 8 over grid.y slices
        y70 = dev.read(y_ptr, (70, rows), stream)
        assert not np.isnan(y70).any(), "an output element was not written"
        assert rel_error(y70, x.astype(np.float64) @ dense.T) <= MATVEC_TOLERANCE
        y11 = y70[:11]
        # b1, b4, b8, b2 kernels, each with a different tiling (rows per CTA / per warp)
        largest = min(MAX_ROWS_PER_CTA, (MAX_SHARED_BYTES - 16) // weight.row_bytes)
        for order, rows_per_cta in (([3], 1), ([5, 2, 7], 5), ([7, 6, 5, 4, 3, 2, 1, 0], largest), ([0, 1], None)):
            y_ptr = dev.poisoned((len(order), rows))
            matvec(weight, dev.upload(x[order]), y_ptr, len(order), stream, rows_per_cta=rows_per_cta)
            y = dev.read(y_ptr, (len(order), rows), stream)
            np.testing.assert_array_equal(y, y11[order], err_msg=f"variance for {order}, {rows_per_cta}")


FUSION_TYPES = [QType.F16, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K]


@pytest.mark.parametrize("qtype", FUSION_TYPES, ids=lambda t: t.name)
def test_matvec_fusions_match_reference_and_are_batch_invariant(gpu, qtype):
    """RMSNorm prologue with each epilogue (store, residual accumulate, SwiGLU on interleaved rows)."""
    drv, module, stream = gpu
    dev, rng, matvec = Device(drv), np.random.default_rng(300 + int(qtype)), MatvecOp(module)
    rows, cols, batch, eps = 260, 512, 11, 1e-6
    weight, dense = upload_weight(dev, qtype, rows, cols, rng)
    x = (3.0 * rng.standard_normal((batch, cols))).astype(np.float32)
    gain = rng.uniform(0.5, 1.5, cols).astype(np.float32)
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt(np.mean(x64 ** 2, axis=1, keepdims=True) + eps) * gain
    product = normed @ dense.T
    gate, up = product[:, 0::2], product[:, 1::2]
    residual = rng.standard_normal((batch, rows), dtype=np.float32)
    with np.errstate(over="ignore"):   # exp(-gate) may overflow to inf: silu -> -0, as on the GPU
        silu = gate / (1 + np.exp(-gate))
    expected = {"store": product, "accumulate": residual + product, "swiglu": silu * up}
    for epilogue, ref in expected.items():
        fusion = MatvecFusion(epilogue, norm_weight_ptr=dev.upload(gain), norm_eps=eps)
        out_rows = rows // 2 if epilogue == "swiglu" else rows
        start = residual if epilogue == "accumulate" else np.full((batch, out_rows), np.nan, np.float32)
        outs = []
        for order in (list(range(batch)), [4], [9, 4, 1]):      # b8 (two chunks), b1, b4
            y_ptr = dev.upload(start[order])
            matvec(weight, dev.upload(x[order]), y_ptr, len(order), stream, fusion=fusion)
            outs.append(dev.read(y_ptr, (len(order), out_rows), stream))
        assert not np.isnan(outs[0]).any()
        assert rel_error(outs[0], ref) <= MATVEC_TOLERANCE, epilogue
        np.testing.assert_array_equal(outs[1], outs[0][[4]], err_msg=f"{epilogue}: B=1 differs")
        np.testing.assert_array_equal(outs[2], outs[0][[9, 4, 1]], err_msg=f"{epilogue}: B=3 differs")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_embedding_gathers_exact_rows(gpu, qtype):
    drv, module, stream = gpu
    dev, rng, embedding = Device(drv), np.random.default_rng(100 + int(qtype)), EmbeddingOp(module)
    vocab, cols = 300, 512
    table, dense = upload_weight(dev, qtype, vocab, cols, rng)
    ids = np.concatenate([rng.integers(0, vocab, 9), [0, vocab - 1, 5, 5]]).astype(np.int32)
    out_ptr = dev.poisoned((len(ids), cols))
    embedding(table, dev.upload(ids), out_ptr, len(ids), stream)
    out = dev.read(out_ptr, (len(ids), cols), stream)
    assert not np.isnan(out).any()
    assert rel_error(out, dense[ids]) <= 1e-6
    bad = np.array([3, -1, vocab], dtype=np.int32)
    out_ptr = dev.poisoned((3, cols))
    embedding(table, dev.upload(bad), out_ptr, 3, stream)
    out = dev.read(out_ptr, (3, cols), stream)
    assert rel_error(out[0], dense[3]) <= 1e-6 and np.isnan(out[1:]).all()




def exact_dequant_reference(raw: np.ndarray, qtype: QType) -> np.ndarray:
    """The dequantized values with the kernels' exact rounding. gguf's numpy dequantizer rounds
    like dequant8 (one fp32 multiply) for Q5_0, Q8_0 and Q6_K; Q4_K is d*scale*q - dmin*min as
    one fma, emulated in float64 (the product and the difference are exact there for these
    scales: a few dozen significant bits) and rounded once to fp32."""
    if qtype != QType.Q4_K:
        return dequantize(raw, qtype)
    from gguf.quants import Q4_K
    blocks = raw.reshape(-1, quant_spec(qtype).block_bytes)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, mn = Q4_K.get_scale_min(blocks[:, 4:16].copy())
    d_s = (d * sc.astype(np.float32)).astype(np.float64)[:, :, None]       # fp32 product, as the kernel
    m_s = (dmin * mn.astype(np.float32)).astype(np.float64)[:, :, None]
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, 8, 32).astype(np.float64)
    return (d_s * q - m_s).astype(np.float32).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("qtype", [QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_dequant8_is_bitwise_exact(gpu, qtype):
    """dequant8 (through the embedding gather, which only dequantizes) gives every value with the
    exact rounding of its formula: the types of the default model, whose dequantization builds
    floats from bytes with bit tricks rather than int->float conversions."""
    drv, module, stream = gpu
    dev, rng, embedding = Device(drv), np.random.default_rng(), EmbeddingOp(module)
    vocab, cols = 64, 1024
    raw = random_weight_bytes(qtype, vocab, cols, rng)
    table = DeviceWeight(int(qtype), vocab, cols, dev.upload(raw))
    ids = np.arange(vocab, dtype=np.int32)
    out_ptr = dev.poisoned((vocab, cols))
    embedding(table, dev.upload(ids), out_ptr, vocab, stream)
    out = dev.read(out_ptr, (vocab, cols), stream)
    np.testing.assert_array_equal(out.view(np.uint32), exact_dequant_reference(raw, qtype).view(np.uint32))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q5_0, QType.Q8_0, QType.Q4_K, QType.Q6_K], ids=lambda t: t.name)
def test_dequant8_half2_is_fp16_of_the_exact_values(gpu, qtype):
    """dequant8_half2 (what every tensor-core layout multiplies; here through the f16gemm layout's
    dequant_slots pass) is bitwise fp16(exact value). Q4_0 / Q5_0 / Q8_0 form d * (q - bias) in half
    precision: checked with scales whose products are fp16 subnormals, overflow to inf, or are
    subnormal scales themselves, besides the usual ones."""
    drv, module, stream = gpu
    dev, rng = Device(drv), np.random.default_rng()
    rows, cols = 96, 1024
    raw = random_weight_bytes(qtype, rows, cols, rng)
    if qtype in (QType.Q4_0, QType.Q5_0, QType.Q8_0):
        blocks = raw.reshape(-1, quant_spec(qtype).block_bytes)
        extreme = np.array([3e-6, -3e-6, 1e-7, 30000.0, -30000.0, 0.0, 6.1e-5, 1.0], np.float16)
        chosen = rng.choice(len(blocks), len(blocks) // 2, replace=False)
        blocks[chosen, 0:2] = rng.choice(extreme, len(chosen)).view(np.uint8).reshape(-1, 2)
    weight = DeviceWeight(int(qtype), rows, cols, dev.upload(raw))
    out_ptr = dev.upload(np.full(rows * cols, np.nan, np.float16))
    units = rows * cols // 8
    kernel = module.get_function(f"dequant_slots_{weight.kernel_suffix}")
    kernel(np.uintp(weight.ptr), np.int32(weight.row_bytes), np.int32(rows), np.int32(cols), np.uintp(out_ptr),
           block=(256, 1, 1), grid=(-(-units // 256), 1), stream=stream)
    stream.synchronize()
    slots = np.empty(rows * cols, np.float16)
    drv.memcpy_dtoh(slots, out_ptr)
    # slot order: in each 32-value sub-chunk, word 4i + q holds natural columns 8q + 2i, 8q + 2i + 1
    natural = slots.reshape(rows, cols // 32, 4, 4, 2).transpose(0, 1, 3, 2, 4).reshape(rows, cols)
    with np.errstate(over="ignore"):
        expected = exact_dequant_reference(raw, qtype).reshape(rows, cols).astype(np.float16)
    np.testing.assert_array_equal(natural.view(np.uint16), expected.view(np.uint16))
