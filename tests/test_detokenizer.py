"""IncrementalDetokenizer: never emits part of a UTF-8 character, replaces invalid bytes only once
they are certainly invalid, and streams exactly what `Tokenizer.decode` gives for the whole list."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.text.detokenizer import IncrementalDetokenizer
from gpu_worker.text.tokenizer import Tokenizer, byte_to_unicode, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_reference.json"
SPECIAL_ID = 256  # <|im_end|> in the byte vocabulary below


@pytest.fixture(scope="module")
def byte_tokenizer() -> Tokenizer:
    """One token per byte value (id = byte), plus one control token: every byte split is reachable."""
    alphabet = byte_to_unicode()
    return Tokenizer.from_metadata({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": [alphabet[b] for b in range(256)] + ["<|im_end|>"],
        "tokenizer.ggml.merges": [], "tokenizer.ggml.token_type": [1] * 256 + [3],
        "tokenizer.ggml.eos_token_id": SPECIAL_ID,
    })


def stream(tokenizer: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, skip_special=skip_special)
    return [detokenizer.push(i) for i in ids] + [detokenizer.flush()]


def test_four_byte_character_is_held_until_complete(byte_tokenizer: Tokenizer) -> None:
    ids = list("a\U0001F600b".encode())
    assert stream(byte_tokenizer, ids) == ["a", "", "", "", "\U0001F600", "b", ""]


def test_invalid_byte_is_replaced_at_once(byte_tokenizer: Tokenizer) -> None:
    # 0xFF can never start a character: certain immediately
    assert stream(byte_tokenizer, [0xFF, ord("x")]) == ["\ufffd", "x", ""]


def test_broken_sequence_is_replaced_only_when_the_next_byte_proves_it(byte_tokenizer: Tokenizer) -> None:
    # E2 82 could still become "€" (E2 82 AC); "A" proves it never will: one U+FFFD, like bytes.decode
    assert stream(byte_tokenizer, [0xE2, 0x82, ord("A")]) == ["", "", "\ufffdA", ""]
    assert b"\xe2\x82A".decode("utf-8", errors="replace") == "\ufffdA"


def test_incomplete_tail_becomes_replacement_on_flush(byte_tokenizer: Tokenizer) -> None:
    detokenizer = IncrementalDetokenizer(byte_tokenizer)
    assert detokenizer.push(0xF0) == "" and detokenizer.push(0x9F) == ""
    assert detokenizer.num_pending_bytes == 2
    assert detokenizer.flush() == "\ufffd"
    assert detokenizer.flush() == ""
    with pytest.raises(ValueError, match="after flush"):
        detokenizer.push(ord("a"))


def test_skip_special(byte_tokenizer: Tokenizer) -> None:
    ids = [ord("h"), SPECIAL_ID, ord("i")]
    assert "".join(stream(byte_tokenizer, ids)) == "h<|im_end|>i"
    assert "".join(stream(byte_tokenizer, ids, skip_special=True)) == "hi"


@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, SPECIAL_ID), max_size=40), skip_special=st.booleans())
def test_stream_equals_whole_decode_for_any_bytes(byte_tokenizer: Tokenizer, ids: list[int],
                                                  skip_special: bool) -> None:
    chunks = stream(byte_tokenizer, ids, skip_special)
    assert "".join(chunks) == byte_tokenizer.decode(ids, skip_special=skip_special)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_valid_text_streams_without_replacement_characters(byte_tokenizer: Tokenizer, text: str) -> None:
    # every byte is its own token here, so each multi-byte character is split at every position
    chunks = stream(byte_tokenizer, list(text.encode()))
    assert "".join(chunks) == text
    assert sum(chunk.count("\ufffd") for chunk in chunks) == text.count("\ufffd")


# --- the real model's tokenizer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(real_model_path: Path) -> Tokenizer:
    return load_tokenizer(str(real_model_path))


@pytest.mark.real_model
def test_real_corpus_streams_to_its_text_without_replacements(qwen: Tokenizer) -> None:
    for case in json.loads(FIXTURE.read_text())["strings"]:
        chunks = stream(qwen, case["ids"])
        assert "".join(chunks) == case["text"]
        assert all("\ufffd" not in chunk for chunk in chunks), case["text"]


@pytest.mark.real_model
@settings(max_examples=300, deadline=None)
@given(ids=st.lists(st.integers(0, 151935), max_size=30), skip_special=st.booleans())
def test_real_random_ids_stream_equals_decode(qwen: Tokenizer, ids: list[int], skip_special: bool) -> None:
    assert "".join(stream(qwen, ids, skip_special)) == qwen.decode(ids, skip_special=skip_special)


def _is_partial_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.fixture(scope="module")
def partial_pieces(qwen: Tokenizer) -> list[int]:
    """The hard cases: ids whose bytes are not whole UTF-8 characters (~1.4k of them)."""
    return [i for i in range(qwen.vocab_size) if _is_partial_utf8(qwen.token_bytes(i))]


@pytest.mark.real_model
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_real_partial_pieces_stream_equals_decode(qwen: Tokenizer, partial_pieces: list[int],
                                                  data: st.DataObject) -> None:
    partial = partial_pieces
    assert len(partial) > 100
    ids = data.draw(st.lists(st.sampled_from(partial) | st.integers(0, qwen.vocab_size - 1),
                             min_size=1, max_size=30))
    assert "".join(stream(qwen, ids)) == qwen.decode(ids)
