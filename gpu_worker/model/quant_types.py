"""Block sizes and names of the GGML tensor types this project supports.

A GGML row of `cols` elements is `cols / block_elems` blocks of `block_bytes` bytes each; cols
must be a multiple of block_elems (32 for the legacy quants, 256 for the K-quants).
"""
from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as QType


@dataclass(frozen=True)
class QuantSpec:
    qtype: QType
    block_elems: int   # elements per block
    block_bytes: int   # bytes per block

    def __post_init__(self) -> None:
        if self.block_elems <= 0 or self.block_bytes <= 0:
            raise ValueError(f"bad block geometry for {self.qtype.name}")

    @property
    def name(self) -> str:
        return self.qtype.name

    def row_nbytes(self, cols: int) -> int:
        """Bytes of one row of `cols` elements; ValueError when cols is not whole blocks."""
        if cols <= 0 or cols % self.block_elems:
            raise ValueError(f"{self.name} rows need a multiple of {self.block_elems} elements, got {cols}")
        return cols // self.block_elems * self.block_bytes


QK_K = 256

SUPPORTED_TYPES: dict[QType, QuantSpec] = {
    spec.qtype: spec for spec in (
        QuantSpec(QType.F32, 1, 4),
        QuantSpec(QType.F16, 1, 2),
        QuantSpec(QType.BF16, 1, 2),
        QuantSpec(QType.Q8_0, 32, 2 + 32),                      # d, qs[32] int8
        QuantSpec(QType.Q4_0, 32, 2 + 16),                      # d, qs[16] nibbles
        QuantSpec(QType.Q4_1, 32, 2 + 2 + 16),                  # d, m, qs[16]
        QuantSpec(QType.Q5_0, 32, 2 + 4 + 16),                  # d, qh[4], qs[16]
        QuantSpec(QType.Q5_1, 32, 2 + 2 + 4 + 16),              # d, m, qh[4], qs[16]
        QuantSpec(QType.Q4_K, QK_K, 2 + 2 + 12 + QK_K // 2),    # d, dmin, scales[12], qs[128]
        QuantSpec(QType.Q5_K, QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # + qh[32]
        QuantSpec(QType.Q6_K, QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql, qh, scales, d
    )
}

FLOAT_TYPES = frozenset({QType.F32, QType.F16, QType.BF16})


def quant_spec(qtype: QType | int) -> QuantSpec:
    """The spec of a supported type; ValueError for anything else."""
    try:
        return SUPPORTED_TYPES[QType(qtype)]
    except (ValueError, KeyError):
        raise ValueError(f"unsupported GGML tensor type {qtype!r}") from None


def type_name(qtype: int) -> str:
    try:
        return QType(qtype).name
    except ValueError:
        return f"type#{qtype}"
