"""Paged KV-cache block accounting (the backend owns the memory, this owns the ids).

A sequence holding n tokens of KV owns ceil(n / block_size) blocks, listed in its block table;
token t lives in slot block_table[t // block_size] * block_size + t % block_size.

Automatic prefix caching (on unless prefix_caching=False): once a full block's KV is written
(`cache_full_blocks`, after the step), its chain key (prefix_cache.py) maps to the block. A new
or preempted sequence reuses the cached blocks of its leading full blocks (`match_prefix` +
`attach_prefix`, ref count + 1) and starts computing after them.

Write-hazard rule: only blocks lying wholly inside tokens [0, num_tokens - 1) are reused, so the
last token (whose logits are sampled) is always computed, and a sequence writes KV only into
blocks it owns alone (ref count 1, not in the cache). No copy-on-write is ever needed; a prompt
that is an exact multiple of block_size recomputes its last block (<= block_size tokens).

Free list: blocks with ref count 0, in eviction order (front first). Freed uncached blocks go to
the front (reused first), freed cached blocks to the back (least recently freed is evicted
first); a cached block handed out again loses its key. Cached-but-unreferenced blocks count as
free: num_free_blocks + blocks with ref count > 0 == num_blocks at all times.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from gpu_worker.engine.prefix_cache import PrefixCache
from gpu_worker.engine.sequence import Sequence


class KVBlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._ref_counts = np.zeros(num_blocks, dtype=np.int32)   # [num_blocks]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cache = PrefixCache()
        self.num_prefix_query_tokens = 0   # prompt tokens looked up at admissions
        self.num_prefix_hit_tokens = 0     # of those, reused from the cache
        self.num_evicted_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks with ref count 0, cached-but-evictable ones included."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix (in use or evictable)."""
        return len(self.cache)

    def ref_count(self, block_id: int) -> int:
        return int(self._ref_counts[block_id])

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` must gain so that its KV can hold num_computed + num_new_tokens tokens."""
        total = self.blocks_for_tokens(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_new_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table for `num_new_tokens` more tokens of KV (all or nothing)."""
        needed = self.num_new_blocks_needed(seq, num_new_tokens)
        if needed == 0:
            return                 # the common decode step: room in the last block
        if needed > len(self._free):
            raise RuntimeError(f"KV exhausted: need {needed} blocks, {len(self._free)} free")
        for _ in range(needed):
            block_id, _ = self._free.popitem(last=False)
            if self.cache.evict(block_id):
                self.num_evicted_blocks += 1
            self._ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def can_append(self, seq: Sequence) -> bool:
        """Room for one decode token."""
        return self.can_allocate(seq, 1)

    def append(self, seq: Sequence) -> None:
        self.allocate(seq, 1)

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks for seq's leading full blocks within tokens [0, num_tokens - 1) (the
        write-hazard rule above); a pure lookup, nothing changes. [] when caching is off."""
        if not self.prefix_caching:
            return []
        matched: list[int] = []
        for index in range((seq.num_tokens - 1) // self.block_size):
            block_id = self.cache.lookup(seq.block_key(index, self.block_size))
            if block_id is None:
                break
            matched.append(block_id)
        return matched

    def num_free_among(self, block_ids: list[int]) -> int:
        """How many of block_ids have ref count 0 (reusing them takes them off the free list)."""
        return sum(1 for b in block_ids if self._ref_counts[b] == 0)

    def attach_prefix(self, seq: Sequence, block_ids: list[int]) -> None:
        """Give a sequence that holds no KV the cached blocks of match_prefix: ref count + 1 each;
        their tokens count as computed."""
        if seq.block_table or seq.num_computed_tokens:
            raise RuntimeError(f"sequence {seq.key} already holds KV; prefixes attach only at admission")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(block_ids) * self.block_size
        seq.num_registered_blocks = len(block_ids)
        seq.num_cached_tokens = seq.num_computed_tokens
        self.num_prefix_query_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register seq's blocks that became full and written (call after the step that wrote
        them). A prefix cached already under another block keeps that block."""
        if not self.prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        if num_full <= seq.num_registered_blocks:
            return                 # no block filled up this step (15 of 16 decode steps)
        for index in range(seq.num_registered_blocks, num_full):
            self.cache.register(seq.block_key(index, self.block_size), seq.block_table[index])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        """Release every block of seq (finish, abort or preemption); idempotent. Last blocks
        first, so a sequence's tail is evicted before its (more shareable) head."""
        for block_id in reversed(seq.block_table):
            if self._ref_counts[block_id] <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self.cache.key_of(block_id) is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table.clear()
        seq.num_registered_blocks = 0

    def check_invariants(self, seqs: list[Sequence] | None = None) -> None:
        """Raise if free list, ref counts and cache disagree; with `seqs` (every sequence holding
        KV), also that ref counts equal table occurrences, reused blocks hold the prefix their
        sequence expects, and blocks still to be written are owned alone and uncached."""
        if np.any(self._ref_counts < 0):
            raise RuntimeError("a KV block has a negative ref count")
        in_use = int(np.count_nonzero(self._ref_counts))
        if in_use + len(self._free) != self.num_blocks:
            raise RuntimeError(f"KV accounting broken: {in_use} in use + {len(self._free)} free != {self.num_blocks}")
        if any(self._ref_counts[b] != 0 for b in self._free):
            raise RuntimeError("a free KV block has a nonzero ref count")
        self.cache.check_invariants(self.num_blocks)
        if seqs is not None:
            self._check_sequences(seqs)

    def _check_sequences(self, seqs: list[Sequence]) -> None:
        tables = [b for s in seqs for b in s.block_table]
        counts = np.bincount(np.array(tables, dtype=np.int64), minlength=self.num_blocks)
        if not np.array_equal(counts, self._ref_counts):
            raise RuntimeError("KV ref counts differ from the blocks the sequences hold")
        for seq in seqs:
            if len(set(seq.block_table)) != len(seq.block_table):
                raise RuntimeError(f"sequence {seq.key} holds a block twice")
            if len(seq.block_table) < self.blocks_for_tokens(seq.num_computed_tokens):
                raise RuntimeError(f"sequence {seq.key} has computed KV outside its blocks")
            for index, block_id in enumerate(seq.block_table):
                key = self.cache.key_of(block_id)
                if (index + 1) * self.block_size <= seq.num_computed_tokens:
                    if key is not None and key != seq.block_key(index, self.block_size):
                        raise RuntimeError(f"sequence {seq.key} block {index} holds another prefix")
                elif key is not None or self._ref_counts[block_id] != 1:
                    raise RuntimeError(f"sequence {seq.key} would write into shared block {block_id}")
