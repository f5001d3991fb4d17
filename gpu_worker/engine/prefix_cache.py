"""Automatic prefix caching: which KV blocks hold which full-block token prefixes.

A full block's key is a chain hash: key_i = H(key_{i-1} || token ids of block i), so equal keys
mean equal whole prefixes (tokens 0 .. (i+1) * block_size), not only equal last blocks. H is
BLAKE2b with a 16-byte digest: a collision would silently reuse the wrong KV, so a cryptographic
hash is used instead of Python's 64-bit hash().

This map only knows key <-> block id; KVBlockManager owns reference counts and the free list
(a cached block with ref count 0 sits in the free list and is evicted when it is handed out).
"""
from __future__ import annotations

import hashlib

import numpy as np

ROOT_KEY = b""   # the parent key of block 0


def chain_key(parent_key: bytes, block_token_ids: np.ndarray) -> bytes:
    """Key of a full block given its parent's key; block_token_ids # [block_size] int32."""
    digest = hashlib.blake2b(parent_key, digest_size=16)
    digest.update(np.ascontiguousarray(block_token_ids, dtype=np.int32).tobytes())
    return digest.digest()


class PrefixCache:
    """Bijection between chain keys and the block ids whose KV holds exactly that prefix."""

    def __init__(self) -> None:
        self._block_of_key: dict[bytes, int] = {}
        self._key_of_block: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._block_of_key)

    def lookup(self, key: bytes) -> int | None:
        return self._block_of_key.get(key)

    def key_of(self, block_id: int) -> bytes | None:
        return self._key_of_block.get(block_id)

    def register(self, key: bytes, block_id: int) -> bool:
        """Map key -> block_id unless the key or the block is taken already (then False: another
        sequence computed the same prefix first, or the block already holds a prefix)."""
        if key in self._block_of_key or block_id in self._key_of_block:
            return False
        self._block_of_key[key] = block_id
        self._key_of_block[block_id] = key
        return True

    def evict(self, block_id: int) -> bool:
        """Forget block_id's prefix (its memory is being reused); False if it held none."""
        key = self._key_of_block.pop(block_id, None)
        if key is None:
            return False
        del self._block_of_key[key]
        return True

    def check_invariants(self, num_blocks: int) -> None:
        if len(self._block_of_key) != len(self._key_of_block):
            raise RuntimeError("prefix cache maps differ in size")
        for key, block_id in self._block_of_key.items():
            if self._key_of_block.get(block_id) != key:
                raise RuntimeError(f"prefix cache maps disagree on block {block_id}")
            if not 0 <= block_id < num_blocks:
                raise RuntimeError(f"prefix cache holds block {block_id} outside [0, {num_blocks})")
