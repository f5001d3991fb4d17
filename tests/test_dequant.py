"""Each dequantizer against gguf.quants.dequantize (the reference) on fresh random blocks."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType
from gguf import quants as reference

from gpu_worker.model.dequant import dequantize, dequantize_blocks, dequantize_rows
from gpu_worker.model.gguf_loader import TensorInfo, load_gguf
from gpu_worker.model.quant_types import SUPPORTED_TYPES, quant_spec
from gpu_worker.model.synthetic import random_blocks

ALL_TYPES = sorted(SUPPORTED_TYPES, key=int)


def _tensor(qtype: QType, raw: np.ndarray, rows: int, cols: int) -> TensorInfo:
    data = np.ascontiguousarray(raw).reshape(-1)
    return TensorInfo("t", qtype, (rows, cols), data, data.size)


def _reference(qtype: QType, raw: np.ndarray, rows: int) -> np.ndarray:
    return reference.dequantize(raw.reshape(rows, -1), qtype).astype(np.float32)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_valid_random_blocks_match_reference(qtype: QType, seed: int) -> None:
    spec = quant_spec(qtype)
    rows, cols = 37, spec.block_elems * 3 if spec.block_elems > 1 else 96
    raw = random_blocks(qtype, rows * cols // spec.block_elems, np.random.default_rng(seed))
    ours = dequantize(_tensor(qtype, raw, rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    assert np.isfinite(ours).all() and np.abs(ours).max() > 0
    np.testing.assert_allclose(ours, _reference(qtype, raw, rows), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_arbitrary_bytes_match_reference_including_nan_and_inf(qtype: QType) -> None:
    """Every byte pattern (scales included) decodes like the reference, NaN/inf scales too."""
    spec = quant_spec(qtype)
    rows, cols = 16, spec.block_elems * 4 if spec.block_elems > 1 else 64
    raw = np.random.default_rng(7).integers(0, 256, rows * spec.row_nbytes(cols), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ours = dequantize(_tensor(qtype, raw, rows, cols))
        ref = _reference(qtype, raw, rows)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_large_tensor_uses_several_chunks_consistently() -> None:
    rows, cols = 300, 4096            # 1.2 M elements: > 4 chunks of the thread pool
    raw = random_blocks(QType.Q6_K, rows * cols // 256, np.random.default_rng(3))
    np.testing.assert_allclose(dequantize(_tensor(QType.Q6_K, raw, rows, cols)),
                               _reference(QType.Q6_K, raw, rows), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("qtype", [QType.Q5_0, QType.Q4_K, QType.F16], ids=lambda t: t.name)
def test_dequantize_rows_equals_rows_of_full_dequantize(qtype: QType) -> None:
    spec = quant_spec(qtype)
    rows, cols = 50, 512
    raw = random_blocks(qtype, rows * cols // spec.block_elems, np.random.default_rng(4))
    tensor = _tensor(qtype, raw, rows, cols)
    ids = np.array([49, 0, 7, 7, 23], dtype=np.int32)
    np.testing.assert_array_equal(dequantize_rows(tensor, ids), dequantize(tensor)[ids])
    assert dequantize_rows(tensor, np.array([], dtype=np.int64)).shape == (0, cols)
    for bad in ([50], [-1]):
        with pytest.raises(IndexError):
            dequantize_rows(tensor, bad)
    with pytest.raises(ValueError):
        dequantize_rows(tensor, np.array([1.5]))


def test_partial_blocks_rejected() -> None:
    with pytest.raises(ValueError):
        dequantize_blocks(QType.Q8_0, np.zeros(35, dtype=np.uint8))


@pytest.mark.real_model
def test_real_model_every_tensor_type_matches_reference(real_model_path) -> None:
    with load_gguf(real_model_path) as model:
        seen: set[QType] = set()
        for tensor in model.tensors.values():
            if tensor.qtype in seen:
                continue
            seen.add(tensor.qtype)
            if len(tensor.shape) == 1:
                np.testing.assert_array_equal(dequantize(tensor), tensor.data.view(np.float32))
                continue
            ids = np.arange(0, tensor.shape[0], max(1, tensor.shape[0] // 64))
            ref = reference.dequantize(tensor.rows_view()[ids], tensor.qtype)
            np.testing.assert_allclose(dequantize_rows(tensor, ids), ref, rtol=1e-6, atol=1e-9)
        assert {t.name for t in seen} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
