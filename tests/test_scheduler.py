"""Scheduler: chunked prefill under a token budget, decodes first, batch cap, preemption by
recompute under a tiny KV cache, unschedulable requests finished instead of looping."""
from __future__ import annotations

from gpu_worker.engine.block_manager import KVBlockManager
from gpu_worker.engine.scheduler import Scheduler, SchedulerOutput
from gpu_worker.engine.sequence import RequestSpec, Sequence, SequenceStatus
from gpu_worker.sampling.params import SamplingParams, StoppingParams


def make_seq(key: int, num_prompt: int) -> Sequence:
    return Sequence(RequestSpec(key, tuple(range(1, num_prompt + 1)), SamplingParams(), StoppingParams()))


def advance(out: SchedulerOutput, new_token: int = 7) -> None:
    """What the engine's postprocess does to the sequences: KV written, a token where sampled."""
    for chunk in out.chunks:
        chunk.seq.num_computed_tokens += chunk.num_tokens
        if chunk.samples:
            chunk.seq.append_token(new_token)


def test_chunked_prefill_respects_the_token_budget() -> None:
    sched = Scheduler(KVBlockManager(64, 4), max_batch=8, max_tokens_per_step=8)
    seq = make_seq(1, 20)
    sched.add(seq)
    sizes, samples = [], []
    for _ in range(3):
        out = sched.schedule()
        sizes.append([c.num_tokens for c in out.chunks])
        samples.append([c.samples for c in out.chunks])
        advance(out)
    assert sizes == [[8], [8], [4]]
    assert samples == [[False], [False], [True]]
    out = sched.schedule()
    assert [(c.num_tokens, c.start, c.samples) for c in out.chunks] == [(1, 20, True)]


def test_decodes_go_first_and_prefill_fills_the_rest_of_the_budget() -> None:
    sched = Scheduler(KVBlockManager(64, 4), max_batch=8, max_tokens_per_step=6)
    a = make_seq(1, 5)
    sched.add(a)
    advance(sched.schedule())                       # a's prompt done, a decodes next
    b = make_seq(2, 30)
    sched.add(b)
    out = sched.schedule()
    assert [(c.seq.key, c.num_tokens) for c in out.chunks] == [(1, 1), (2, 5)]
    assert out.num_tokens == 6


def test_max_batch_caps_sequences_per_step_and_running_set() -> None:
    sched = Scheduler(KVBlockManager(64, 4), max_batch=3, max_tokens_per_step=100)
    for k in range(5):
        sched.add(make_seq(k, 2))
    out = sched.schedule()
    assert [c.seq.key for c in out.chunks] == [0, 1, 2]
    assert len(sched.running) == 3 and len(sched.waiting) == 2


def test_preemption_by_recompute_under_tiny_kv_never_crashes() -> None:
    bm = KVBlockManager(num_blocks=4, block_size=2)    # 8 token slots in all
    sched = Scheduler(bm, max_batch=4, max_tokens_per_step=16)
    a, b = make_seq(1, 3), make_seq(2, 3)
    sched.add(a)
    sched.add(b)
    preempted_keys = []
    for _ in range(6):
        out = sched.schedule()
        preempted_keys += [s.key for s in out.preempted]
        advance(out)
        bm.check_invariants()
        assert sum(len(s.block_table) for s in (a, b)) == bm.num_used_blocks
    assert preempted_keys and preempted_keys[0] == 2           # the newer one gives way
    assert b.num_preemptions >= 1 and b.status is SequenceStatus.WAITING
    sched.finish(a, "length")
    out = sched.schedule()                                     # b comes back and recomputes
    assert out.chunks[0].seq is b and out.chunks[0].start == 0
    assert out.chunks[0].num_tokens == b.num_tokens           # prompt + its generated tokens
    assert b.num_tokens > 3


def test_sequence_alone_at_cache_capacity_finishes_with_length() -> None:
    bm = KVBlockManager(num_blocks=2, block_size=2)             # 4 tokens of KV in all
    sched = Scheduler(bm, max_batch=2, max_tokens_per_step=16)
    seq = make_seq(1, 3)
    sched.add(seq)
    for _ in range(3):
        out = sched.schedule()
        advance(out)
    assert seq.is_finished and seq.finish_reason == "length" and out.finished == [seq]
    assert bm.num_free_blocks == 2


def test_prompt_larger_than_the_cache_is_an_error_not_a_hang() -> None:
    bm = KVBlockManager(num_blocks=2, block_size=2)
    sched = Scheduler(bm, max_batch=2, max_tokens_per_step=16)
    big, small = make_seq(1, 9), make_seq(2, 2)
    sched.add(big)
    sched.add(small)
    out = sched.schedule()
    assert out.finished == [big] and big.finish_reason == "error" and "KV blocks" in big.error_message
    assert [c.seq for c in out.chunks] == [small]


def test_finish_frees_blocks_wherever_the_sequence_is() -> None:
    bm = KVBlockManager(num_blocks=8, block_size=2)
    sched = Scheduler(bm, max_batch=1, max_tokens_per_step=16)
    running, waiting = make_seq(1, 3), make_seq(2, 3)
    sched.add(running)
    sched.add(waiting)
    advance(sched.schedule())
    assert bm.num_used_blocks == 2
    sched.finish(waiting, "cancelled")
    sched.finish(running, "cancelled")
    sched.finish(running, "cancelled")                         # idempotent
    assert not sched.has_work and bm.num_free_blocks == 8


def test_sequence_views_stay_valid_while_the_buffer_grows() -> None:
    seq = make_seq(1, 3)
    first_view = seq.token_ids
    for t in range(100):
        seq.append_token(1000 + t)
    assert first_view.tolist() == [1, 2, 3]
    assert seq.token_ids.tolist() == [1, 2, 3] + list(range(1000, 1100))
    assert seq.output_token_ids.tolist() == list(range(1000, 1100)) and seq.num_output_tokens == 100
    assert not seq.token_ids.flags.writeable
