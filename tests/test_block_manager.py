"""KVBlockManager: exact accounting, boundaries, exhaustion, random alloc/free sequences."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.engine.block_manager import KVBlockManager
from gpu_worker.engine.sequence import RequestSpec, Sequence
from gpu_worker.sampling.params import SamplingParams, StoppingParams


def make_seq(key: int, num_prompt: int) -> Sequence:
    return Sequence(RequestSpec(key, tuple(range(1, num_prompt + 1)), SamplingParams(), StoppingParams()))


def test_allocate_rounds_up_to_blocks_and_free_returns_all() -> None:
    bm = KVBlockManager(num_blocks=10, block_size=4)
    seq = make_seq(1, 5)
    assert bm.num_new_blocks_needed(seq, 5) == 2
    bm.allocate(seq, 5)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 8 and bm.num_used_blocks == 2
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 10
    bm.check_invariants()


def test_append_takes_a_block_only_at_a_boundary() -> None:
    bm = KVBlockManager(num_blocks=4, block_size=4)
    seq = make_seq(1, 4)
    bm.allocate(seq, 4)
    seq.num_computed_tokens = 3
    assert bm.num_new_blocks_needed(seq, 1) == 0     # slot 3 of block 0 is still free
    seq.num_computed_tokens = 4
    assert bm.num_new_blocks_needed(seq, 1) == 1
    bm.append(seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 2


def test_exhaustion_is_reported_not_crashed_and_all_or_nothing() -> None:
    bm = KVBlockManager(num_blocks=3, block_size=2)
    a, b = make_seq(1, 4), make_seq(2, 4)
    bm.allocate(a, 4)
    assert not bm.can_allocate(b, 4)
    with pytest.raises(RuntimeError, match="KV exhausted"):
        bm.allocate(b, 4)
    assert b.block_table == [] and bm.num_free_blocks == 1   # nothing half-allocated
    bm.check_invariants()


def test_blocks_are_distinct_across_sequences_and_double_free_is_caught() -> None:
    bm = KVBlockManager(num_blocks=8, block_size=2)
    seqs = [make_seq(k, 3) for k in range(4)]
    for s in seqs:
        bm.allocate(s, 3)
    owned = [b for s in seqs for b in s.block_table]
    assert sorted(owned) == list(range(8))
    stolen = list(seqs[0].block_table)
    bm.free(seqs[0])
    seqs[0].block_table = stolen
    with pytest.raises(RuntimeError, match="double free"):
        bm.free(seqs[0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 9)), min_size=1, max_size=60))
def test_random_alloc_free_keeps_exact_accounting(ops: list[tuple[int, int]]) -> None:
    bm = KVBlockManager(num_blocks=12, block_size=3)
    seqs = {k: make_seq(k, 1) for k in range(6)}
    for key, n in ops:
        seq = seqs[key]
        if n == 9:
            bm.free(seq)
            seq.num_computed_tokens = 0
        elif bm.can_allocate(seq, n):
            bm.allocate(seq, n)
            seq.num_computed_tokens += n
        bm.check_invariants()
        in_tables = sum(len(s.block_table) for s in seqs.values())
        assert in_tables == bm.num_used_blocks
        for s in seqs.values():
            assert len(s.block_table) == bm.blocks_for_tokens(s.num_computed_tokens)
    for s in seqs.values():
        bm.free(s)
    assert bm.num_free_blocks == 12
