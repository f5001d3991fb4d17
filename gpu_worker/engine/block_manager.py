"""Paged KV-cache block accounting (the backend owns the memory, this owns the ids).

A sequence holding n tokens of KV owns ceil(n / block_size) blocks, listed in its block table;
token t lives in slot block_table[t // block_size] * block_size + t % block_size.
Blocks carry reference counts so that shared (e.g. prefix) blocks could be added later; today
every owned block has ref count 1. Accounting is exact: num_free_blocks + blocks in use ==
num_blocks at all times (`check_invariants` verifies it in tests).
"""
from __future__ import annotations

from collections import deque

import numpy as np

from gpu_worker.engine.sequence import Sequence


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)   # [num_blocks]
        self._free_ids: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_ids)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain so that its KV can hold num_computed + num_new_tokens tokens."""
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks_needed(seq, num_new_tokens) <= len(self._free_ids)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table for `num_new_tokens` more tokens of KV (all or nothing)."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed > len(self._free_ids):
            raise RuntimeError(f"KV exhausted: need {needed} blocks, {len(self._free_ids)} free")
        for _ in range(needed):
            block_id = self._free_ids.popleft()
            self._ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Room for one decode token."""
        return self.can_allocate(seq, 1)

    def append(self, seq: Sequence) -> None:
        self.allocate(seq, 1)

    def free(self, seq: Sequence) -> None:
        """Release every block of seq (finish, abort or preemption); idempotent."""
        for block_id in reversed(seq.block_table):
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_ids.append(block_id)
        seq.block_table.clear()

    def check_invariants(self) -> None:
        """Raise if the free list and ref counts disagree (used by tests and the load test)."""
        free = set(self._free_ids)
        if len(free) != len(self._free_ids):
            raise RuntimeError("a KV block is in the free list twice")
        in_use = int(np.count_nonzero(self._ref_counts))
        if in_use + len(free) != self.num_blocks:
            raise RuntimeError(f"KV accounting broken: {in_use} in use + {len(free)} free != {self.num_blocks}")
        if any(self._ref_counts[b] != 0 for b in free):
            raise RuntimeError("a free KV block has a nonzero ref count")
