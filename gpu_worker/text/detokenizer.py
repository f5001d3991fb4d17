"""Streaming token ids -> text that never splits a UTF-8 character.

A byte-level BPE token can end in the middle of a character (an emoji is often 2-4 tokens). Bytes
of an incomplete trailing sequence are held back until the next token completes it. A sequence is
replaced by U+FFFD only once it is certain to be invalid (a byte that cannot continue it arrives,
or the stream is flushed), with the same maximal-subpart rule as `bytes.decode(errors="replace")`,
so that `"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids)` holds for any ids.
"""
from __future__ import annotations

import codecs
from typing import Protocol


class TokenBytesSource(Protocol):
    def token_bytes(self, token_id: int) -> bytes: ...

    def is_special(self, token_id: int) -> bool: ...


class IncrementalDetokenizer:
    """Per-request state: the UTF-8 decoder's pending bytes (at most 3) and the ids seen."""

    def __init__(self, tokenizer: TokenBytesSource, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._flushed = False
        self.num_tokens = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        if self._flushed:
            raise ValueError("push() after flush(): this detokenizer's stream has ended")
        self.num_tokens += 1
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id), final=False)

    def push_many(self, token_ids: list[int]) -> str:
        return "".join(self.push(token_id) for token_id in token_ids)

    @property
    def num_pending_bytes(self) -> int:
        """Bytes held back because they may start a character that later tokens complete."""
        pending, _ = self._decoder.getstate()
        return len(pending)

    def flush(self) -> str:
        """End of stream: held-back bytes that never completed become U+FFFD."""
        if self._flushed:
            return ""
        self._flushed = True
        return self._decoder.decode(b"", final=True)
