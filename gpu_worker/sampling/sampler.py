"""The sampler specification (numpy). The CUDA sampler implements exactly this.

`sample(logits, req)` for one sequence, `logits`: float32 [vocab]. Steps, in this order:

1. logit_bias      x[id] += float32(bias) for every (id, bias) pair, in the given order.
2. repetition      for every distinct id in `seen_token_ids` (prompt + output):
                   x[id] = x[id] / p if x[id] > 0 else x[id] * p          (p = repetition_penalty)
3. frequency       for every distinct id in `output_token_ids` occurring n times:
   and presence    x[id] = (x[id] - frequency * float32(n)) - presence
   Steps 1-3 are float32 element-wise IEEE operations (no fused multiply-add), so they are
   bit-exact on the GPU. A step whose parameter is its off value is skipped.
4. temperature     0 -> greedy: the lowest id among the maximal x (no RNG, steps 5-7 skipped).
                   Otherwise x = x / float32(temperature) (float32 division; skipped when 1).
5. order           candidates sorted by x descending, ties by lower id first: the (prob desc,
                   id asc) order of docs/ARCHITECTURE.md.
                   weights w = exp(float64(x) - float64(x_max)), so w of the first candidate is 1.
6. truncation      top_k  (k > 0): keep the first k candidates.
                   top_p  (< 1): keep candidate i while the sum of the weights before it is
                          < top_p * (sum of kept weights) (float64, summed in candidate order);
                          the first candidate is always kept.
                   min_p  (> 0): keep candidates with w >= min_p (w_max is 1, i.e. p >= min_p * p_max).
7. draw            u = philox.uniform(seed, step) (in [0, 1 - 2^-24]); c = running float64 sum of
                   kept weights in candidate order; the token is the first candidate with
                   c > u * c_last (the last kept one if rounding leaves none).

Logprobs (when `logprobs` or `top_logprobs > 0`) describe the model's own distribution, as vLLM's
do: log-softmax (float64) of the raw logits, before bias, penalties, temperature and truncation.
`top` holds the `top_logprobs` most likely ids of that distribution, most likely first, ties by
lower id.
"""
from __future__ import annotations

import numpy as np

from gpu_worker.backends.base import SampleRequest, TokenLogprobs
from gpu_worker.sampling import philox
from gpu_worker.sampling.params import SamplingParams


def _check_ids(name: str, ids: np.ndarray, vocab_size: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab_size})")
    return ids


def apply_logit_bias(x: np.ndarray, logit_bias: tuple[tuple[int, float], ...]) -> None:
    """In place on float32 x [vocab]."""
    for token_id, bias in logit_bias:
        if not (0 <= token_id < x.shape[0]):
            raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary [0, {x.shape[0]})")
        x[token_id] = x[token_id] + np.float32(bias)


def apply_repetition_penalty(x: np.ndarray, seen_token_ids: np.ndarray, penalty: float) -> None:
    """In place: llama.cpp / HF style, each distinct seen id penalised once."""
    ids = np.unique(_check_ids("seen_token_ids", seen_token_ids, x.shape[0]))
    values = x[ids]
    p = np.float32(penalty)
    x[ids] = np.where(values > 0, values / p, values * p)


def apply_frequency_presence(x: np.ndarray, output_token_ids: np.ndarray, frequency: float,
                             presence: float) -> None:
    """In place: OpenAI style, over generated ids only: x - frequency * count - presence."""
    ids, counts = np.unique(_check_ids("output_token_ids", output_token_ids, x.shape[0]), return_counts=True)
    x[ids] = (x[ids] - np.float32(frequency) * counts.astype(np.float32)) - np.float32(presence)


def processed_logits(logits: np.ndarray, req: SampleRequest) -> np.ndarray:
    """Steps 1-3: a float32 copy of `logits` [vocab] with bias and penalties applied."""
    params = req.params
    x = np.array(logits, dtype=np.float32, copy=True)
    if params.logit_bias:
        apply_logit_bias(x, params.logit_bias)
    if params.repetition_penalty != 1.0:
        apply_repetition_penalty(x, req.seen_token_ids, params.repetition_penalty)
    if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
        apply_frequency_presence(x, req.output_token_ids, params.frequency_penalty, params.presence_penalty)
    return x


def sorted_candidates(scaled: np.ndarray, top_k: int) -> np.ndarray:
    """Step 5 (+ top_k): ids by scaled logit descending, ties by lower id; only the first k if k > 0."""
    vocab_size = scaled.shape[0]
    if 0 < top_k < vocab_size:
        # Every id whose value reaches the k-th largest, then a stable sort: exact at ties.
        kth_value = np.partition(scaled, vocab_size - top_k)[vocab_size - top_k]
        pool = np.flatnonzero(scaled >= kth_value)
        order = pool[np.argsort(-scaled[pool], kind="stable")]
        return order[:top_k]
    return np.argsort(-scaled, kind="stable")


def truncate(scaled: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Steps 5-6: (candidate ids [n] int64, weights [n] float64) in candidate order."""
    candidates = sorted_candidates(scaled, params.top_k)
    weights = np.exp(scaled[candidates].astype(np.float64) - np.float64(scaled[candidates[0]]))
    if params.top_p < 1.0:
        mass_before = np.cumsum(weights) - weights
        num_kept = max(1, int(np.count_nonzero(mass_before < params.top_p * weights.sum())))
        candidates, weights = candidates[:num_kept], weights[:num_kept]
    if params.min_p > 0.0:
        num_kept = max(1, int(np.count_nonzero(weights >= params.min_p)))
        candidates, weights = candidates[:num_kept], weights[:num_kept]
    return candidates, weights


def draw(candidates: np.ndarray, weights: np.ndarray, u: float) -> int:
    """Step 7: the first candidate whose running weight sum exceeds u * total."""
    running = np.cumsum(weights)
    index = int(np.searchsorted(running, u * running[-1], side="right"))
    return int(candidates[min(index, len(candidates) - 1)])


def token_logprobs(logits: np.ndarray, token_id: int, num_top: int) -> TokenLogprobs:
    """Log-softmax of the raw logits: the sampled id's value and the `num_top` best alternatives."""
    raw = logits.astype(np.float64)
    finite_max = raw.max()
    log_total = finite_max + np.log(np.exp(raw - finite_max).sum())
    top: tuple[tuple[int, float], ...] = ()
    if num_top > 0:
        best = sorted_candidates(logits.astype(np.float32), num_top)
        top = tuple((int(i), float(raw[i] - log_total)) for i in best)
    return TokenLogprobs(token_id=token_id, logprob=float(raw[token_id] - log_total), top=top)


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D [vocab] array, got shape {logits.shape}")
    if np.isnan(logits).any():
        raise ValueError("logits contain NaN")
    if not np.isfinite(logits.max()):
        raise ValueError(f"logits maximum is {logits.max()}; need a finite best token")
    return logits


def sample(logits: np.ndarray, req: SampleRequest) -> tuple[int, TokenLogprobs | None]:
    """One token for one sequence at generation step `req.step` (see the module docstring)."""
    logits = _check_logits(logits)
    params = req.params
    x = processed_logits(logits, req)
    if not np.isfinite(x.max()):
        raise ValueError("no finite logit is left after logit_bias and penalties")
    if params.is_greedy:
        token_id = int(np.argmax(x))  # first maximal index = lowest id
    else:
        if params.temperature != 1.0:
            x = x / np.float32(params.temperature)
        candidates, weights = truncate(x, params)
        token_id = draw(candidates, weights, philox.uniform(params.seed, req.step))
    if not (params.logprobs or params.top_logprobs > 0):
        return token_id, None
    return token_id, token_logprobs(logits, token_id, params.top_logprobs)
