"""Automatic prefix caching: chain keys, reuse of full blocks (never the one holding the last
token), exact ref counts, LRU eviction of unreferenced blocks only; and on the real CPU backend,
outputs bitwise identical with and without the cache (greedy and seeded sampling, logprobs,
batched, chunked prefill, preemption, aborts) while the backend really computes fewer tokens."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.backends.base import StepBatch, StepOutput
from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.engine.block_manager import KVBlockManager
from gpu_worker.engine.engine import Engine, FinishOut, TokenOut
from gpu_worker.engine.scheduler import Scheduler
from gpu_worker.engine.sequence import RequestSpec, Sequence
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.worker_main import create_engine, parse_args


def make_seq(key: int, prompt: list[int]) -> Sequence:
    return Sequence(RequestSpec(key, tuple(prompt), SamplingParams(), StoppingParams()))


def compute(bm: KVBlockManager, seq: Sequence) -> None:
    """Admit seq the way the scheduler does and 'compute' its whole prompt in one step."""
    bm.attach_prefix(seq, bm.match_prefix(seq))
    bm.allocate(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_chain_keys_name_the_whole_prefix_not_only_the_block() -> None:
    a, b, c = make_seq(1, [1, 2, 3, 4, 5, 6]), make_seq(2, [9, 2, 3, 4, 5, 6]), make_seq(3, [1, 2, 3, 4, 5, 6])
    assert a.block_key(1, 2) != b.block_key(1, 2)          # same block tokens, other parent
    assert [a.block_key(i, 2) for i in range(3)] == [c.block_key(i, 2) for i in range(3)]
    with pytest.raises(ValueError, match="not full"):
        a.block_key(3, 2)


def test_reuse_stops_before_the_block_holding_the_last_token() -> None:
    bm = KVBlockManager(num_blocks=16, block_size=4)
    first = make_seq(1, list(range(1, 11)))                # 10 tokens: blocks 0, 1 full
    compute(bm, first)
    assert bm.num_cached_blocks == 2
    cases = {12: 2, 9: 2, 8: 1, 5: 1, 4: 0}                # prompt length -> blocks reused
    for length, reused in cases.items():
        seq = make_seq(100 + length, list(range(1, length + 1)))
        assert bm.match_prefix(seq) == first.block_table[:reused], length
    other = make_seq(2, [1, 2, 3, 4, 99, 6, 7, 8, 9])       # differs inside block 1
    assert bm.match_prefix(other) == first.block_table[:1]


def test_shared_blocks_are_freed_by_their_last_user_and_stay_cached() -> None:
    bm = KVBlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(1, list(range(1, 11))), make_seq(2, list(range(1, 9)) + [50, 51, 52])
    compute(bm, a)
    compute(bm, b)
    shared = a.block_table[:2]
    assert b.block_table[:2] == shared and b.num_cached_tokens == 8
    assert [bm.ref_count(x) for x in shared] == [2, 2]
    assert bm.num_used_blocks == 4                          # 2 shared + 1 tail each
    bm.check_invariants([a, b])
    bm.free(a)
    assert [bm.ref_count(x) for x in shared] == [1, 1] and bm.num_used_blocks == 3
    bm.check_invariants([b])
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 2   # evictable, still cached
    again = make_seq(3, list(range(1, 12)))
    compute(bm, again)
    assert again.block_table[:2] == shared and again.num_cached_tokens == 8
    assert bm.num_prefix_hit_tokens == 16
    bm.check_invariants([again])


def test_eviction_takes_uncached_then_least_recently_freed_and_never_a_held_block() -> None:
    bm = KVBlockManager(num_blocks=6, block_size=2)
    held, old, new = make_seq(1, [1, 2, 3]), make_seq(2, [5, 6, 7]), make_seq(3, [8, 9, 10])
    for seq in (held, old, new):
        compute(bm, seq)                                    # 2 blocks each, block 0 cached
    new_head = new.block_table[0]
    bm.free(old)
    bm.free(new)
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 3
    filler = make_seq(4, list(range(20, 29)))
    bm.allocate(filler, 4)                                  # 2 blocks: the 2 uncached tails
    assert bm.num_cached_blocks == 3 and bm.num_evicted_blocks == 0
    bm.allocate(filler, 6)                                  # 3rd block: old's head (freed first)
    assert bm.num_evicted_blocks == 1 and bm.num_cached_blocks == 2
    assert bm.match_prefix(make_seq(5, [5, 6, 7])) == []
    assert bm.match_prefix(make_seq(6, [8, 9, 10])) == [new_head]
    bm.allocate(filler, 8)                                  # 4th: new's head; held's stays
    assert bm.num_free_blocks == 0 and bm.num_evicted_blocks == 2
    assert bm.match_prefix(make_seq(6, [8, 9, 10])) == []
    assert bm.match_prefix(make_seq(7, [1, 2, 3])) == held.block_table[:1]
    with pytest.raises(RuntimeError, match="KV exhausted"):
        bm.allocate(filler, 9)                              # held's cached block is not evictable
    filler.num_computed_tokens = 8
    bm.check_invariants([held, filler])


def test_disabled_cache_neither_registers_nor_reuses() -> None:
    bm = KVBlockManager(num_blocks=8, block_size=2, prefix_caching=False)
    a, b = make_seq(1, [1, 2, 3, 4, 5]), make_seq(2, [1, 2, 3, 4, 5])
    compute(bm, a)
    compute(bm, b)
    assert bm.num_cached_blocks == 0 and not set(a.block_table) & set(b.block_table)


def test_invariants_catch_a_wrong_ref_count_and_a_write_into_a_shared_block() -> None:
    bm = KVBlockManager(num_blocks=8, block_size=2)
    a, b = make_seq(1, [1, 2, 3, 4, 5]), make_seq(2, [1, 2, 3, 4, 6])
    compute(bm, a)
    compute(bm, b)
    bm.check_invariants([a, b])
    with pytest.raises(RuntimeError, match="ref counts differ"):
        bm.check_invariants([a])                            # b's references unaccounted
    b.num_computed_tokens = 2                               # as if b would rewrite block 1
    with pytest.raises(RuntimeError, match="shared block"):
        bm.check_invariants([a, b])


def simulate(requests: list[tuple[int, int, int]], num_blocks: int) -> tuple[int, int, int]:
    """Scheduler + block manager under a small cache: requests from 4 shared prefixes arrive, run
    a few steps, finish or get aborted; after every step the ref counts equal the block tables
    and nothing is written into a shared block; at the end every block is free.
    Returns (hit tokens, preemptions, evicted blocks)."""
    bm = KVBlockManager(num_blocks=num_blocks, block_size=2)
    sched = Scheduler(bm, max_batch=4, max_tokens_per_step=6)
    prefixes = [[p + 1] * 5 + [p + 2] * 4 for p in range(4)]
    live: list[Sequence] = []
    num_preempted = 0
    for key, (prefix, suffix, fate) in enumerate(requests):
        seq = make_seq(key, prefixes[prefix] + [200 + key] * (suffix % 5))
        sched.add(seq)
        live.append(seq)
        for _ in range(1 + fate % 3):
            out = sched.schedule()
            num_preempted += len(out.preempted)
            for chunk in out.chunks:
                chunk.seq.num_computed_tokens += chunk.num_tokens
                bm.cache_full_blocks(chunk.seq)
                if chunk.samples:
                    chunk.seq.append_token(100 + chunk.seq.num_tokens % 7)
                    if chunk.seq.num_output_tokens >= 2 + (chunk.seq.key + fate) % 6:
                        sched.finish(chunk.seq, "length")
            bm.check_invariants(sched.running + list(sched.waiting))
        if fate == 9:
            sched.finish(live[suffix % len(live)], "cancelled")
        live = [s for s in live if not s.is_finished]
        bm.check_invariants(sched.running + list(sched.waiting))
    for seq in live:
        sched.finish(seq, "cancelled")
    bm.check_invariants([])
    assert bm.num_free_blocks == num_blocks and bm.num_used_blocks == 0
    return bm.num_prefix_hit_tokens, num_preempted, bm.num_evicted_blocks


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 14), st.integers(0, 9)), min_size=1, max_size=40),
       st.integers(4, 24))
def test_random_workloads_keep_ref_counts_exact(requests: list[tuple[int, int, int]], num_blocks: int) -> None:
    simulate(requests, num_blocks)


def test_random_workloads_reach_hits_preemption_and_eviction() -> None:
    """The same checks over seeded workloads, which together must exercise all three paths."""
    totals = [0, 0, 0]
    for seed in range(30):
        rng = random.Random(seed)
        requests = [(rng.randrange(4), rng.randrange(1, 15), rng.randrange(10)) for _ in range(30)]
        for i, count in enumerate(simulate(requests, rng.randrange(6, 20))):
            totals[i] += count
    assert min(totals) > 0, totals


def test_worker_flag_turns_the_cache_off() -> None:
    base = ["--model", "m.gguf", "--socket-dir", "/tmp/x"]
    assert parse_args(base).prefix_cache is True
    assert parse_args(base + ["--no-prefix-cache"]).prefix_cache is False


class CountingCpuBackend(CpuBackend):
    """The real numpy backend, recording how many tokens each step fed it."""

    def __init__(self, model) -> None:
        super().__init__(model)
        self.tokens_per_step: list[int] = []

    def step(self, batch: StepBatch) -> StepOutput:
        self.tokens_per_step.append(batch.num_tokens)
        return super().step(batch)


@pytest.fixture
def model(small_vocab_model):
    """The shared tiny model with the 269-token byte vocabulary (conftest.py)."""
    return small_vocab_model


def make_engine(model, prefix_cache: bool, num_blocks: int = 160, block_size: int = 4,
                max_tokens_per_step: int = 24) -> Engine:
    return create_engine(model, CountingCpuBackend(model), num_blocks, block_size, max_batch=32,
                         max_tokens_per_step=max_tokens_per_step, prefix_cache=prefix_cache)


SYSTEM_PROMPTS = [[(7 * p + 3 * i) % 250 + 1 for i in range(n)] for p, n in enumerate((64, 23, 40))]


def chat_spec(key: int, max_tokens: int = 10, system: int | None = None) -> RequestSpec:
    """A request whose prompt starts with one of the shared system prompts, then its own tokens."""
    rng = random.Random(key)
    prompt = SYSTEM_PROMPTS[key % 3 if system is None else system] + [rng.randrange(1, 260)
                                                                      for _ in range(rng.randrange(1, 12))]
    temperature = 0.0 if key % 4 == 0 else 0.8
    sampling = SamplingParams(temperature=temperature, top_k=30 if key % 2 else 0, seed=1000 + key,
                              logprobs=True, top_logprobs=key % 3)
    return RequestSpec(key, tuple(prompt), sampling, StoppingParams(max_tokens=max_tokens, ignore_eos=key % 5 == 0))


def run(engine: Engine, specs: list[RequestSpec], abort_at: dict[int, int] | None = None):
    """Drive to idle, checking the block invariants against the live sequences every step;
    returns {key: [TokenOut]} and {key: (reason, completion_tokens)}."""
    tokens: dict[int, list[TokenOut]] = {s.request_key: [] for s in specs}
    finished: dict[int, tuple[str, int]] = {}
    for s in specs:
        assert engine.add_request(s) == []
    step = 0
    while engine.has_work:
        events = [e for key, at in (abort_at or {}).items() if at == step for e in engine.abort(key)]
        for ev in events + engine.step():
            if isinstance(ev, TokenOut):
                tokens[ev.request_key].append(ev)
            else:
                assert isinstance(ev, FinishOut)
                finished[ev.request_key] = (ev.reason, ev.completion_tokens)
        step += 1
        engine.check_invariants()
        assert step < 2000, "the engine stopped making progress"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return tokens, finished


def test_second_request_with_a_64_token_prefix_computes_only_the_rest(model) -> None:
    engine = make_engine(model, prefix_cache=True, max_tokens_per_step=256)
    first, second = chat_spec(0, max_tokens=3, system=0), chat_spec(4, max_tokens=3, system=0)
    run(engine, [first])
    engine.backend.tokens_per_step.clear()
    tokens, _ = run(engine, [second])
    suffix = len(second.prompt_token_ids) - 64
    assert engine.backend.tokens_per_step == [suffix, 1, 1]    # prefill of the suffix, 2 decodes
    assert engine.stats()["prefix_cache_hit_tokens"] == 64
    uncached = make_engine(model, prefix_cache=False, max_tokens_per_step=256)
    expected, _ = run(uncached, [second])
    assert uncached.backend.tokens_per_step == [len(second.prompt_token_ids), 1, 1]
    assert tokens == expected


def test_a_fully_cached_prompt_recomputes_only_its_last_block(model) -> None:
    engine = make_engine(model, prefix_cache=True, max_tokens_per_step=256)
    prompt = RequestSpec(1, tuple(SYSTEM_PROMPTS[0]), SamplingParams(temperature=0.0, logprobs=True),
                         StoppingParams(max_tokens=4))
    expected, _ = run(engine, [prompt])
    engine.backend.tokens_per_step.clear()
    again, _ = run(engine, [prompt])
    assert engine.backend.tokens_per_step[0] == 4            # 64 tokens = 16 full blocks; last one redone
    assert again == expected


@pytest.mark.parametrize("num_blocks,max_tokens_per_step", [(160, 24), (160, 7), (40, 24)],
                         ids=["chunked", "small-chunks", "preemption"])
def test_outputs_bitwise_equal_with_and_without_the_cache(model, num_blocks: int, max_tokens_per_step: int) -> None:
    """16 requests over 3 shared system prompts: each run alone without the cache, vs all 16 in
    one batch with it (hits between requests admitted in different steps), vs a second batch
    on the warm cache."""
    specs = [chat_spec(k) for k in range(16)]
    alone = {}
    for s in specs:
        tokens, finished = run(make_engine(model, prefix_cache=False), [s])
        alone[s.request_key] = (tokens[s.request_key], finished[s.request_key])
    engine = make_engine(model, prefix_cache=True, num_blocks=num_blocks, max_tokens_per_step=max_tokens_per_step)
    for attempt in range(2):
        tokens, finished = run(engine, specs)
        for s in specs:
            assert (tokens[s.request_key], finished[s.request_key]) == alone[s.request_key], (attempt, s.request_key)
    stats = engine.stats()
    computed = sum(engine.backend.tokens_per_step)
    fed = 2 * sum(len(s.prompt_token_ids) + len(alone[s.request_key][0]) for s in specs)
    assert stats["prefix_cache_hit_tokens"] >= 16 * 20 and computed < fed
    if num_blocks == 40:
        assert engine.num_preemptions > 0


def test_aborting_one_sharer_leaves_the_others_unchanged(model) -> None:
    specs = [chat_spec(k, max_tokens=12, system=1) for k in range(6)]
    reference, _ = run(make_engine(model, prefix_cache=False), specs)
    engine = make_engine(model, prefix_cache=True, num_blocks=30, max_tokens_per_step=16)
    tokens, finished = run(engine, specs, abort_at={0: 1, 3: 4, 5: 9})
    for key, (reason, _) in finished.items():
        if reason == "cancelled":
            assert tokens[key] == reference[key][:len(tokens[key])]
        else:
            assert tokens[key] == reference[key]
    assert sum(r == "cancelled" for r, _ in finished.values()) == 3
    assert engine.stats()["prefix_cache_hit_tokens"] > 0


def test_random_engine_workloads_equal_the_uncached_engine(model) -> None:
    """Random arrivals, aborts and a tight cache; every step's invariants hold and the tokens
    equal those of the same schedule with the cache off (same arrivals, same aborts)."""
    for trial in range(3):
        rng = random.Random(trial)
        specs = [chat_spec(100 * trial + k, max_tokens=rng.randrange(1, 9)) for k in range(10)]
        aborts = {s.request_key: rng.randrange(0, 12) for s in rng.sample(specs, 3)}
        on = make_engine(model, prefix_cache=True, num_blocks=rng.randrange(26, 60),
                         max_tokens_per_step=rng.randrange(4, 40))
        off = make_engine(model, prefix_cache=False, num_blocks=on.block_manager.num_blocks,
                          max_tokens_per_step=on.scheduler.max_tokens_per_step)
        tokens_on, finished_on = run(on, specs, aborts)
        tokens_off, finished_off = run(off, specs, aborts)
        for key, (reason, _) in finished_on.items():
            if "cancelled" in (reason, finished_off[key][0]):     # aborts land at other points
                n = min(len(tokens_on[key]), len(tokens_off[key]))
                assert tokens_on[key][:n] == tokens_off[key][:n]
            else:
                assert (tokens_on[key], finished_on[key]) == (tokens_off[key], finished_off[key])
        assert on.stats()["prefix_cache_hit_tokens"] > 0
