"""Philox-4x32-10 counter-based RNG (Salmon et al., SC'11; Random123's `philox4x32_10`).

The sampler's uniform draw for a request at generation step `step` is a pure function of
(seed, step), so a request's tokens never depend on what else shares the batch. This module is the
specification the CUDA sampler reproduces bit-for-bit (all integer arithmetic, exact float):

    key     = (seed & 0xFFFFFFFF, seed >> 32)                 # 64-bit seed split lo, hi
    counter = (step & 0xFFFFFFFF, step >> 32, 0, 0)           # 64-bit step split lo, hi
    x0, x1, x2, x3 = philox4x32_10(counter, key)
    uniform = float(x0 >> 8) * 2**-24                         # in [0, 1 - 2^-24]

`uniform` has 24 significant bits, so it is exactly representable in float32 and float64; in CUDA:
`(float)(x0 >> 8) * 0x1p-24f`. Checked against Random123's published known-answer vectors.
"""
from __future__ import annotations

import numpy as np

_MASK32 = 0xFFFFFFFF
_MULTIPLIER_0 = 0xD2511F53
_MULTIPLIER_1 = 0xCD9E8D57
_WEYL_0 = 0x9E3779B9   # key bump: golden ratio
_WEYL_1 = 0xBB67AE85   # key bump: sqrt(3) - 1
NUM_ROUNDS = 10
UNIFORM_SCALE = 2.0 ** -24


def _check_u64(name: str, value: int) -> None:
    if not (0 <= value < 2**64):
        raise ValueError(f"{name} must be in [0, 2^64), got {value}")


def philox4x32(counter: tuple[int, int, int, int], key: tuple[int, int],
               num_rounds: int = NUM_ROUNDS) -> tuple[int, int, int, int]:
    """One Philox-4x32 block: four 32-bit counter words and two key words -> four output words."""
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(f"philox4x32 needs 4 counter words and 2 key words, got {len(counter)}, {len(key)}")
    for word in (*counter, *key):
        if not (0 <= word <= _MASK32):
            raise ValueError(f"philox4x32 words must be 32-bit unsigned, got {word}")
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_index in range(num_rounds):
        if round_index:  # the key is bumped between rounds, not before the first
            k0 = (k0 + _WEYL_0) & _MASK32
            k1 = (k1 + _WEYL_1) & _MASK32
        product_0 = _MULTIPLIER_0 * c0
        product_1 = _MULTIPLIER_1 * c2
        c0, c1, c2, c3 = (
            (product_1 >> 32) ^ c1 ^ k0,
            product_1 & _MASK32,
            (product_0 >> 32) ^ c3 ^ k1,
            product_0 & _MASK32,
        )
    return c0, c1, c2, c3


def random_words(seed: int, step: int) -> tuple[int, int, int, int]:
    """The four 32-bit words for (seed, step): key = seed (lo, hi), counter = (step lo, step hi, 0, 0)."""
    _check_u64("seed", seed)
    _check_u64("step", step)
    return philox4x32((step & _MASK32, step >> 32, 0, 0), (seed & _MASK32, seed >> 32))


def uniform(seed: int, step: int) -> float:
    """The draw in [0, 1 - 2^-24] for a request's generation step: (word0 >> 8) * 2^-24."""
    return (random_words(seed, step)[0] >> 8) * UNIFORM_SCALE


def uniform_batch(seeds: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Vectorised `uniform` for many (seed, step) pairs (tests, batched CPU sampling).

    seeds, steps: [n] uint64  ->  [n] float64, equal element-wise to `uniform(seed, step)`.
    """
    seeds = np.asarray(seeds, dtype=np.uint64)
    steps = np.asarray(steps, dtype=np.uint64)
    if seeds.shape != steps.shape:
        raise ValueError(f"seeds {seeds.shape} and steps {steps.shape} must have the same shape")
    mask = np.uint64(_MASK32)
    shift = np.uint64(32)
    c0, c1 = steps & mask, steps >> shift
    c2 = np.zeros_like(steps)
    c3 = np.zeros_like(steps)
    k0, k1 = seeds & mask, seeds >> shift
    for round_index in range(NUM_ROUNDS):
        if round_index:
            k0 = (k0 + np.uint64(_WEYL_0)) & mask
            k1 = (k1 + np.uint64(_WEYL_1)) & mask
        # 32 x 32 -> 64-bit products fit in uint64 exactly
        product_0 = np.uint64(_MULTIPLIER_0) * c0
        product_1 = np.uint64(_MULTIPLIER_1) * c2
        c0, c1, c2, c3 = (
            (product_1 >> shift) ^ c1 ^ k0,
            product_1 & mask,
            (product_0 >> shift) ^ c3 ^ k1,
            product_0 & mask,
        )
    return (c0 >> np.uint64(8)).astype(np.float64) * UNIFORM_SCALE
