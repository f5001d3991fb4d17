"""Engine on the real CPU backend: batching changes nothing (bitwise), preemption by recompute
changes nothing, aborts free KV within one step, finish reasons, rejected requests."""
from __future__ import annotations

import pytest

from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.engine.engine import Engine, FinishOut, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.worker_main import create_engine


def make_engine(model, num_blocks: int = 128, block_size: int = 4, max_batch: int = 32,
                max_tokens_per_step: int = 24) -> Engine:
    return create_engine(model, CpuBackend(model), num_blocks, block_size, max_batch, max_tokens_per_step)


def spec(key: int, prompt_len: int, seed: int, max_tokens: int = 12, **stopping) -> RequestSpec:
    temperature = 0.0 if seed % 4 == 0 else 0.9
    prompt = tuple((key * 37 + i * 11) % 250 + 1 for i in range(prompt_len))
    return RequestSpec(key, prompt, SamplingParams(temperature=temperature, top_k=40 if seed % 3 else 0,
                                                   seed=seed, logprobs=True, top_logprobs=seed % 3),
                       StoppingParams(max_tokens=max_tokens, **stopping))


def run(engine: Engine, specs: list[RequestSpec], abort_at: dict[int, int] | None = None):
    """Drive the engine to idle; returns {key: [TokenOut]}, {key: FinishOut}."""
    tokens: dict[int, list[TokenOut]] = {s.request_key: [] for s in specs}
    finished: dict[int, FinishOut] = {}
    for s in specs:
        assert engine.add_request(s) == []
    step = 0
    while engine.has_work:
        for key, at in (abort_at or {}).items():
            if at == step:
                events = engine.abort(key)
                finished.update({e.request_key: e for e in events})
        for ev in engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_key].append(ev)
            else:
                finished[ev.request_key] = ev
        step += 1
        engine.check_invariants()
    return tokens, finished


def test_alone_equals_in_a_batch_of_16_bitwise(small_vocab_model) -> None:
    specs = [spec(k, prompt_len=3 + 5 * k, seed=1000 + k) for k in range(16)]
    alone = {}
    for s in specs:
        tokens, finished = run(make_engine(small_vocab_model), [s])
        alone[s.request_key] = (tokens[s.request_key], finished[s.request_key].reason)
    engine = make_engine(small_vocab_model)
    tokens, finished = run(engine, specs)
    assert engine.num_steps < sum(len(v[0]) for v in alone.values())     # really batched
    for s in specs:
        assert tokens[s.request_key] == alone[s.request_key][0]          # ids and logprobs, exactly
        assert finished[s.request_key].reason == alone[s.request_key][1]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_preemption_by_recompute_gives_the_same_tokens(small_vocab_model) -> None:
    specs = [spec(k, prompt_len=10, seed=7 + k, max_tokens=20, ignore_eos=True) for k in range(6)]
    reference, _ = run(make_engine(small_vocab_model), specs)
    tight = make_engine(small_vocab_model, num_blocks=12, block_size=4)   # 48 slots for 6 x 30 tokens
    tokens, finished = run(tight, specs)
    assert tight.num_preemptions > 0
    assert tokens == reference
    assert all(f.reason == "length" and f.completion_tokens == 20 for f in finished.values())
    assert tight.block_manager.num_free_blocks == 12


def test_abort_takes_effect_next_step_and_frees_blocks(small_vocab_model) -> None:
    engine = make_engine(small_vocab_model)
    specs = [spec(k, prompt_len=8, seed=k + 1, max_tokens=30, ignore_eos=True) for k in range(3)]
    for s in specs:
        engine.add_request(s)
    for _ in range(4):
        engine.step()
    used_before = engine.block_manager.num_used_blocks
    events = engine.abort(1)
    assert [(e.request_key, e.reason) for e in events] == [(1, "cancelled")]
    assert events[0].completion_tokens == 4
    assert engine.block_manager.num_used_blocks < used_before
    later = engine.step()
    assert all(e.request_key != 1 for e in later)
    assert engine.abort(1) == []                                          # already gone
    engine.abort_all()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_stop_ids_eos_and_length(small_vocab_model) -> None:
    base = spec(1, prompt_len=6, seed=4, max_tokens=16, ignore_eos=True)   # greedy
    tokens, finished = run(make_engine(small_vocab_model), [base])
    ids = [t.token_id for t in tokens[1]]
    assert finished[1].reason == "length" and len(ids) == 16
    stop_at = next(i for i in range(1, 16) if ids[i] not in ids[:i])
    stopped = spec(1, prompt_len=6, seed=4, max_tokens=16, stop_token_ids=(ids[stop_at],), ignore_eos=True)
    tokens, finished = run(make_engine(small_vocab_model), [stopped])
    assert [t.token_id for t in tokens[1]] == ids[:stop_at]                # stop id not emitted
    assert (finished[1].reason, finished[1].completion_tokens) == ("stop", stop_at)
    as_eos = spec(1, prompt_len=6, seed=4, max_tokens=16, eos_token_ids=(ids[stop_at],))
    _, finished = run(make_engine(small_vocab_model), [as_eos])
    assert finished[1].reason == "eos"


def test_context_length_ends_generation(small_vocab_model) -> None:
    ctx = small_vocab_model.config.context_length
    engine = make_engine(small_vocab_model, num_blocks=600, max_tokens_per_step=512)
    tokens, finished = run(engine, [spec(1, prompt_len=ctx - 3, seed=4, max_tokens=50, ignore_eos=True)])
    assert finished[1].reason == "length" and len(tokens[1]) == 3


def test_bad_requests_finish_with_an_error_not_a_crash(small_vocab_model) -> None:
    engine = make_engine(small_vocab_model)
    vocab = small_vocab_model.config.vocab_size
    bad_id = RequestSpec(1, (1, vocab), SamplingParams(), StoppingParams())
    assert engine.add_request(bad_id)[0].reason == "error"
    engine.add_request(spec(2, 4, seed=1))
    dup = engine.add_request(spec(2, 4, seed=1))
    assert dup[0].reason == "error" and "already in flight" in dup[0].message
    huge = engine.add_request(spec(3, small_vocab_model.config.context_length, seed=1))
    assert huge[0].reason == "error"
    with pytest.raises(ValueError):
        RequestSpec(4, (), SamplingParams(), StoppingParams())


def test_a_failing_backend_step_fails_its_requests_only(small_vocab_model) -> None:
    engine = make_engine(small_vocab_model)
    engine.add_request(spec(1, 4, seed=1))
    engine.backend.kv = None            # the backend now raises on step (real error path)
    events = engine.step()
    assert [(e.request_key, e.reason) for e in events if isinstance(e, FinishOut)] == [(1, "error")]
    assert "backend step failed" in events[0].message
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
