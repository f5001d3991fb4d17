"""The f16gemm layout's "slot order" in numpy (cuda/common.cuh: slot_position), for checking the
fp16 copies that producers (rms_norm, attention, the SwiGLU epilogue) write beside their outputs."""
from __future__ import annotations

import numpy as np


def slot_positions(cols: int) -> np.ndarray:
    """positions[c]: where column c goes. In each 32-column sub-chunk, the pair 8q + 2i, 8q + 2i + 1
    is 32-bit word 4i + q."""
    c = np.arange(cols)
    pair = (c % 32) // 2
    return c - c % 32 + 2 * (4 * (pair % 4) + pair // 4) + c % 2


def slot_order_f16(values: np.ndarray) -> np.ndarray:
    """[rows, cols] fp32 -> the fp16 copy in slot order (round to nearest even, as __float2half_rn)."""
    values = values.reshape(values.shape[0], -1)
    out = np.empty(values.shape, np.float16)
    out[:, slot_positions(values.shape[1])] = values.astype(np.float16)
    return out


def assert_same_halves(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Bitwise equality of two fp16 arrays (NaN poison included)."""
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16), err_msg=what)
