"""Engine-level measurements (no gRPC): the worker's own Engine over a backend, stepped directly.

Every request is greedy with ignore_eos, so lengths are fixed; prompts are distinct random ids
(seeded) so no two sequences share a prefix. Each function takes a `Budget` and stops starting
new work once it is exceeded, saying so in its result.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from benchmarks.common import Budget
from gpu_worker.engine.engine import Engine, FinishOut, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.sampling.params import SamplingParams, StoppingParams

GREEDY = SamplingParams(temperature=0.0)
# Request keys stay unique across every measurement of one engine.
_keys = itertools.count(1)


def random_prompts(num: int, length: int, vocab_size: int, seed: int) -> list[tuple[int, ...]]:
    """`num` distinct prompts of `length` ids drawn from the first min(vocab, 30000) ids (ordinary
    text tokens in Qwen's vocabulary; specials sit at the end)."""
    rng = np.random.default_rng(seed)
    high = min(vocab_size, 30000)
    return [tuple(int(t) for t in rng.integers(0, high, length)) for _ in range(num)]


def add_requests(engine: Engine, prompts: list[tuple[int, ...]], max_tokens: int) -> list[int]:
    keys = []
    for prompt in prompts:
        key = next(_keys)
        spec = RequestSpec(key, prompt, GREEDY, StoppingParams(max_tokens=max_tokens, ignore_eos=True))
        errors = [e for e in engine.add_request(spec) if isinstance(e, FinishOut)]
        if errors:
            raise RuntimeError(f"request refused: {errors[0].message}")
        keys.append(key)
    return keys


def check_finishes(events: list[Any]) -> None:
    """RuntimeError when a request ended in error (a benchmark of failures is worthless)."""
    bad = [e for e in events if isinstance(e, FinishOut) and e.reason == "error"]
    if bad:
        raise RuntimeError(f"{len(bad)} request(s) failed; first: {bad[0].message}")


def measure_decode(engine: Engine, vocab_size: int, batch: int, prompt_len: int, warmup_steps: int,
                   timed_steps: int, max_tokens: int) -> dict[str, Any]:
    """Steady-state decode: `batch` sequences prefilled (not timed; early ones decode meanwhile),
    `warmup_steps` decode steps (not timed), then `timed_steps` engine steps in which every
    sequence decodes one token; `max_tokens` must be large enough that none finishes before."""
    prompts = random_prompts(batch, prompt_len, vocab_size, seed=batch)
    keys = add_requests(engine, prompts, max_tokens=max_tokens)
    started_keys: set[int] = set()
    events: list[Any] = []
    while len(started_keys) < batch:                      # prefill: until every sequence has a token
        step_events = engine.step()
        events += step_events
        started_keys.update(e.request_key for e in step_events if isinstance(e, TokenOut))
        check_finishes(step_events)
    for _ in range(warmup_steps):
        check_finishes(engine.step())
    num_tokens, started = 0, time.perf_counter()
    for _ in range(timed_steps):
        step_events = engine.step()
        num_tokens += sum(1 for e in step_events if isinstance(e, TokenOut))
        check_finishes(step_events)
    elapsed = time.perf_counter() - started
    for key in keys:
        engine.abort(key)
    if num_tokens != batch * timed_steps:
        raise RuntimeError(f"expected {batch * timed_steps} decode tokens, got {num_tokens} "
                           "(not steady state)")
    return {"batch": batch, "tok_s": num_tokens / elapsed, "ms_per_step": 1e3 * elapsed / timed_steps,
            "timed_steps": timed_steps, "prompt_len": prompt_len}


def measure_prefill(engine: Engine, vocab_size: int, num_tokens: int, repeats: int) -> dict[str, Any]:
    """One prompt of `num_tokens` ids and max_tokens=1: latency from add_request to its finish (the
    prefill forward plus the first token's sampling), median over `repeats` after one warm-up."""
    latencies = []
    prompts = random_prompts(repeats + 1, num_tokens, vocab_size, seed=10_000 + num_tokens)
    for i, prompt in enumerate(prompts):
        started = time.perf_counter()
        add_requests(engine, [prompt], max_tokens=1)
        events: list[Any] = []
        num_steps = 0
        while engine.has_work:
            events += engine.step()
            num_steps += 1
        check_finishes(events)
        if i > 0:   # the first run warms this shape up
            latencies.append(time.perf_counter() - started)
    median_s = float(np.median(latencies))
    return {"tokens": num_tokens, "latency_ms": 1e3 * median_s, "tok_s": num_tokens / median_s,
            "min_latency_ms": 1e3 * min(latencies), "repeats": len(latencies), "engine_steps": num_steps}


def measure_aggregate(engine: Engine, vocab_size: int, num_seqs: int, prompt_len: int, new_tokens: int,
                      budget: Budget) -> dict[str, Any]:
    """The issue's aggregate test: `num_seqs` requests arrive at once (prompt_len-token prompts,
    new_tokens each); output tokens / wall time from the first add to the last finish."""
    prompts = random_prompts(num_seqs, prompt_len, vocab_size, seed=20_000 + num_seqs)
    started = time.perf_counter()
    keys = add_requests(engine, prompts, max_tokens=new_tokens)
    num_tokens = num_steps = 0
    finished: list[FinishOut] = []
    while engine.has_work:
        if budget.exceeded():
            for key in keys:
                engine.abort(key)
            return {**budget.skip_note(), "tokens_so_far": num_tokens, "steps_so_far": num_steps}
        step_events = engine.step()
        num_steps += 1
        num_tokens += sum(1 for e in step_events if isinstance(e, TokenOut))
        finished += [e for e in step_events if isinstance(e, FinishOut)]
    elapsed = time.perf_counter() - started
    check_finishes(finished)
    if num_tokens != num_seqs * new_tokens:
        raise RuntimeError(f"expected {num_seqs * new_tokens} tokens, got {num_tokens}")
    ttft = sorted(e.ttft_ns / 1e6 for e in finished)
    return {"num_seqs": num_seqs, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "output_tok_s": num_tokens / elapsed,
            "total_tok_s": num_seqs * (prompt_len + new_tokens) / elapsed,
            "wall_s": elapsed, "engine_steps": num_steps, "preemptions": engine.num_preemptions,
            "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99))}


def each_within_budget(budget: Budget, sizes: list[int], measure: Any, engine: Engine) -> dict[str, Any]:
    """{size: measure(size)} until the budget runs out; the rest recorded as skipped. A failure of
    one size is recorded (its requests aborted) and the next size still runs."""
    results: dict[str, Any] = {}
    for size in sizes:
        if budget.exceeded():
            results[str(size)] = budget.skip_note()
            continue
        try:
            results[str(size)] = measure(size)
        except Exception as exc:  # noqa: BLE001 -- recorded; the other sizes still run
            results[str(size)] = {"error": f"{type(exc).__name__}: {exc}"}
            engine.abort_all()
    return results
