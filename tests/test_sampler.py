"""Sampler specification: Philox known answers, each transform with exact float32 expectations,
greedy ties, the draw rule pinned against an independent inverse-CDF, chi-square statistics of
top-k / top-p / min-p draws over many (seed, step) pairs, determinism and logprobs."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gpu_worker.backends.base import SampleRequest
from gpu_worker.sampling import philox
from gpu_worker.sampling.params import SamplingParams
from gpu_worker.sampling.sampler import draw, processed_logits, sample

NO_IDS = np.zeros(0, dtype=np.int32)


def request(step: int = 0, seen: list[int] | None = None, output: list[int] | None = None,
            **params: object) -> SampleRequest:
    return SampleRequest(params=SamplingParams(**params), step=step,  # type: ignore[arg-type]
                         seen_token_ids=np.array(seen or [], dtype=np.int32),
                         output_token_ids=np.array(output or [], dtype=np.int32))


# --- Philox-4x32-10 ------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, expected", [   # Random123 kat_vectors, philox4x32 10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter: tuple, key: tuple, expected: tuple) -> None:
    assert philox.philox4x32(counter, key) == expected


def test_uniform_is_word0_top_24_bits_keyed_by_seed_and_step() -> None:
    seed, step = 0x0123456789ABCDEF, 0x0000000500000007
    words = philox.philox4x32((0x00000007, 0x00000005, 0, 0), (0x89ABCDEF, 0x01234567))
    assert philox.uniform(seed, step) == (words[0] >> 8) / 2**24
    seeds = np.arange(2000, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    steps = np.arange(2000, dtype=np.uint64) % np.uint64(37)
    batch = philox.uniform_batch(seeds, steps)
    assert batch.tolist() == [philox.uniform(int(s), int(t)) for s, t in zip(seeds, steps, strict=True)]
    assert batch.min() >= 0.0 and batch.max() <= 1.0 - 2**-24
    assert np.all(batch * 2**24 == np.floor(batch * 2**24))   # exactly 24-bit values
    assert len(set(batch.tolist())) > 1990                     # no visible collisions
    with pytest.raises(ValueError, match="seed"):
        philox.uniform(2**64, 0)


# --- the transforms, exactly in float32 ----------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_once_per_id() -> None:
    logits = np.array([2.0, -2.0, 0.5, 0.0, 3.0], dtype=np.float32)
    x = processed_logits(logits, request(seen=[0, 1, 1, 1, 3], repetition_penalty=2.0))
    assert x.tolist() == [1.0, -4.0, 0.5, 0.0, 3.0]


def test_frequency_and_presence_count_generated_ids_only() -> None:
    logits = np.array([1.0, 1.0, 0.5, 1.0, 3.0], dtype=np.float32)
    x = processed_logits(logits, request(seen=[0, 1], output=[4, 4, 2], frequency_penalty=0.5,
                                         presence_penalty=0.25))
    assert x.tolist() == [1.0, 1.0, 0.5 - 0.5 - 0.25, 1.0, 3.0 - 1.0 - 0.25]


def test_order_is_bias_then_repetition_then_frequency() -> None:
    logits = np.array([3.0, 1.0], dtype=np.float32)
    x = processed_logits(logits, request(seen=[0, 1], output=[0], logit_bias=((1, -2.0),),
                                         repetition_penalty=2.0, frequency_penalty=1.0))
    # id 0: 3 / 2 - 1 = 0.5 (other order: (3 - 1) / 2 = 1);  id 1: (1 - 2) * 2 = -2 (other: 0.5 - 2)
    assert x.tolist() == [0.5, -2.0]


def test_float32_arithmetic_is_the_specification() -> None:
    logits = np.array([0.1, -0.3], dtype=np.float32)
    x = processed_logits(logits, request(seen=[0, 1], output=[1, 1, 1], repetition_penalty=1.3,
                                         frequency_penalty=0.7, presence_penalty=0.1))
    f32 = np.float32
    expected_1 = (f32(-0.3) * f32(1.3) - f32(0.7) * f32(3.0)) - f32(0.1)
    assert x.dtype == np.float32 and x.tolist() == [f32(0.1) / f32(1.3), expected_1]


# --- greedy --------------------------------------------------------------------------------------

def test_greedy_is_exact_argmax_with_ties_to_lowest_id() -> None:
    logits = np.array([1.0, 5.0, 5.0, 2.0, 5.0], dtype=np.float32)
    for seed in range(5):
        assert sample(logits, request(step=seed, temperature=0.0, seed=seed))[0] == 1
    nearly = np.array([1.0, np.nextafter(np.float32(5), np.float32(0)), 5.0], dtype=np.float32)
    assert sample(nearly, request(temperature=0.0))[0] == 2


def test_greedy_sees_bias_and_penalties() -> None:
    logits = np.array([4.0, 3.0, 1.0], dtype=np.float32)
    assert sample(logits, request(temperature=0.0, logit_bias=((2, 3.5),)))[0] == 2
    assert sample(logits, request(temperature=0.0, seen=[0], repetition_penalty=2.0))[0] == 1
    assert sample(logits, request(temperature=0.0, output=[0, 0], frequency_penalty=0.6))[0] == 1


# --- the draw rule, against an independent inverse CDF -------------------------------------------

def reference_distribution(logits: np.ndarray, temperature: float = 1.0, top_k: int = 0,
                           top_p: float = 1.0, min_p: float = 0.0) -> dict[int, float]:
    """Plain-python restatement of the truncation rules: {id: probability} over the kept ids,
    in candidate order (probability descending, ties by lower id)."""
    scaled = [float(np.float32(v) / np.float32(temperature)) for v in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    if top_k:
        order = order[:top_k]
    weights = [math.exp(scaled[i] - scaled[order[0]]) for i in order]
    if top_p < 1.0:
        total, mass, kept = sum(weights), 0.0, 0
        while kept < len(order) and (kept == 0 or mass < top_p * total):
            mass += weights[kept]
            kept += 1
        order, weights = order[:kept], weights[:kept]
    if min_p > 0.0:
        kept_pairs = [(i, w) for i, w in zip(order, weights, strict=True) if w >= min_p]
        order, weights = [i for i, _ in kept_pairs], [w for _, w in kept_pairs]
    total = sum(weights)
    return {i: w / total for i, w in zip(order, weights, strict=True)}


def inverse_cdf(distribution: dict[int, float], u: float) -> int:
    cumulative = 0.0
    for token_id, probability in distribution.items():
        cumulative += probability
        if cumulative > u:
            return token_id
    return list(distribution)[-1]


SETTINGS = [
    {},
    {"temperature": 0.6},
    {"top_k": 5},
    {"top_p": 0.8},
    {"min_p": 0.1},
    {"temperature": 1.4, "top_k": 12, "top_p": 0.9, "min_p": 0.02},
]


@pytest.fixture(scope="module")
def logits() -> np.ndarray:
    values = np.random.default_rng(7).normal(0.0, 1.5, size=32).astype(np.float32)
    values[5] = values[9] = values.max()   # a tie at the top: order must break it by id
    return values


@pytest.mark.parametrize("settings", SETTINGS)
def test_each_draw_is_the_inverse_cdf_of_the_philox_uniform(logits: np.ndarray, settings: dict) -> None:
    distribution = reference_distribution(logits, **settings)
    for pair in range(300):
        seed, step = 0xC0FFEE + pair * 7919, pair % 13
        token, _ = sample(logits, request(step=step, seed=seed, **settings))
        assert token == inverse_cdf(distribution, philox.uniform(seed, step)), (seed, step)


def drawn_ids(logits: np.ndarray, num_draws: int = 400, **settings: object) -> set[int]:
    return {sample(logits, request(step=i % 4, seed=i // 4, **settings))[0] for i in range(num_draws)}


def test_top_k_ties_at_the_boundary_keep_the_lower_ids() -> None:
    logits = np.array([1.0, 2.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert drawn_ids(logits, top_k=2) == {1, 2}
    assert drawn_ids(logits, top_k=5, temperature=0.3) == drawn_ids(logits, top_k=0, temperature=0.3)


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass() -> None:
    # four equal weights: the first two hold exactly half the mass, so top_p = 0.5 keeps two
    logits = np.zeros(4, dtype=np.float32)
    assert drawn_ids(logits, top_p=0.5) == {0, 1}
    assert drawn_ids(logits, top_p=0.51) == {0, 1, 2}
    assert drawn_ids(logits, top_p=0.01) == {0}


def test_min_p_threshold_is_inclusive() -> None:
    # weights exp(x - x_max): 1, 0.5, 0.25 exactly (log 2 steps in float32 are not exact, so build
    # the ratio from the float32 logits themselves)
    logits = np.array([0.0, -1.0, -2.0], dtype=np.float32)
    ratio = float(np.exp(np.float64(logits[1])))
    assert drawn_ids(logits, min_p=ratio) == {0, 1}
    assert drawn_ids(logits, min_p=float(np.nextafter(ratio, 1.0))) == {0}


def test_draw_takes_the_first_candidate_whose_running_sum_exceeds_u_total() -> None:
    candidates = np.array([7, 3, 9, 1])
    weights = np.array([1.0, 1.0, 1.0, 1.0])
    draws = [draw(candidates, weights, u) for u in (0.0, 0.2499, 0.25, 0.5, 0.75, 1 - 2**-24)]
    assert draws == [7, 7, 3, 9, 1, 1]   # a running sum equal to u * total is not "exceeding" it


def chi_square_critical(dof: int, z: float = 3.0902) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09 -> alpha = 0.001."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


@pytest.mark.parametrize("settings", SETTINGS)
def test_draw_frequencies_match_the_truncated_distribution(logits: np.ndarray, settings: dict) -> None:
    distribution = reference_distribution(logits, **settings)
    num_draws = 4000
    counts = np.zeros(len(logits), dtype=np.int64)
    for draw_index in range(num_draws):
        seed, step = 1_000_003 * (draw_index // 16) + 17, draw_index % 16
        counts[sample(logits, request(step=step, seed=seed, **settings))[0]] += 1
    excluded = [i for i in range(len(logits)) if i not in distribution]
    assert counts[excluded].sum() == 0, "a truncated-away token was drawn"
    # pool categories expected < 5 times so the chi-square approximation holds
    expected = {i: p * num_draws for i, p in distribution.items()}
    big = [i for i, e in expected.items() if e >= 5]
    small = [i for i in expected if i not in big]
    observed_cells = [counts[i] for i in big] + ([counts[small].sum()] if small else [])
    expected_cells = [expected[i] for i in big] + ([sum(expected[i] for i in small)] if small else [])
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed_cells, expected_cells, strict=True))
    if len(observed_cells) > 1:
        assert statistic < chi_square_critical(len(observed_cells) - 1), (statistic, settings)


# --- determinism ---------------------------------------------------------------------------------

def test_same_seed_and_step_give_the_same_token_and_seeds_differ() -> None:
    rng = np.random.default_rng(3)
    prompts = [rng.normal(0, 2, size=500).astype(np.float32) for _ in range(5)]
    for logits in prompts:
        runs = {tuple(sample(logits, request(step=t, seed=42, top_p=0.95))[0] for t in range(20))
                for _ in range(10)}
        assert len(runs) == 1
        other = tuple(sample(logits, request(step=t, seed=43, top_p=0.95))[0] for t in range(20))
        assert other != next(iter(runs))


# --- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_of_the_raw_distribution_with_sorted_alternatives() -> None:
    logits = np.array([1.0, 3.0, 3.0, 2.0, 3.0, -1.0], dtype=np.float32)
    naive = np.log(np.exp(logits.astype(np.float64)) / np.exp(logits.astype(np.float64)).sum())
    token, logprobs = sample(logits, request(step=1, seed=5, temperature=0.5, logit_bias=((0, 50.0),),
                                             logprobs=True, top_logprobs=4))
    assert token == 0 and logprobs is not None   # the bias decides the token ...
    assert logprobs.token_id == 0
    assert logprobs.logprob == pytest.approx(naive[0], abs=1e-12)   # ... but not the logprob
    assert [i for i, _ in logprobs.top] == [1, 2, 4, 3]
    assert [lp for _, lp in logprobs.top] == pytest.approx(naive[[1, 2, 4, 3]].tolist(), abs=1e-12)
    assert sample(logits, request(temperature=0.0))[1] is None
    only_token = sample(logits, request(temperature=0.0, logprobs=True))[1]
    assert only_token is not None and only_token.top == ()


# --- validation ----------------------------------------------------------------------------------

@pytest.mark.parametrize("logits, req, message", [
    (np.array([0.0, np.nan], dtype=np.float32), request(), "NaN"),
    (np.zeros((2, 3), dtype=np.float32), request(), "1-D"),
    (np.array([-np.inf, -np.inf], dtype=np.float32), request(), "finite"),
    (np.zeros(4, dtype=np.float32), request(seen=[4], repetition_penalty=1.5), "seen_token_ids"),
    (np.zeros(4, dtype=np.float32), request(output=[9], presence_penalty=1.0), "output_token_ids"),
    (np.zeros(4, dtype=np.float32), request(logit_bias=((4, 1.0),)), "logit_bias token id 4"),
])
def test_bad_inputs_raise_value_error(logits: np.ndarray, req: SampleRequest, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        sample(logits, req)
