"""Tokenizer: a tiny hand-built byte-level vocabulary (always), and the real model's tokenizer
checked id-for-id against transformers' GGUF tokenizer on a corpus of hard strings (fixture made
by tools/make_tokenizer_fixtures.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.text.tokenizer import Tokenizer, byte_to_unicode, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_reference.json"
IM_START, IM_END, ENDOFTEXT, TOOL_CALL = "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<tool_call>"


def tiny_metadata() -> dict:
    """256 byte tokens (id = byte value), merges h+e, he+l, hel+l, hell+o, Ġ+w, then 3 control tokens
    and one user-defined token."""
    alphabet = byte_to_unicode()
    tokens = [alphabet[b] for b in range(256)]
    merges = ["h e", "he l", "hel l", "hell o", "\u0120 w"]
    tokens += ["he", "hel", "hell", "hello", "\u0120w"]                      # ids 256..260
    tokens += [ENDOFTEXT, IM_START, IM_END, TOOL_CALL]                       # ids 261..264
    return {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": [1] * 261 + [3, 3, 3, 4],
        "tokenizer.ggml.eos_token_id": 263, "tokenizer.chat_template": "{{ messages[0].content }}",
    }


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return Tokenizer.from_metadata(tiny_metadata())


def test_merges_are_applied_within_pre_tokens(tiny: Tokenizer) -> None:
    # "hello" merges fully; " w" is one pre-token (Ġw); "orld" has no merges -> bytes
    assert tiny.encode("hello world") == [259, 260, ord("o"), ord("r"), ord("l"), ord("d")]
    # digits are split one by one by the Qwen2 regex, and "hel" alone stops at its own merge
    assert tiny.encode("hel12") == [257, ord("1"), ord("2")]


def test_special_tokens_in_text_are_single_ids_and_no_bos(tiny: Tokenizer) -> None:
    assert tiny.encode("") == []
    assert tiny.encode(f"{IM_START}hello{IM_END}") == [262, 259, 263]
    assert tiny.encode(f"{TOOL_CALL}{ENDOFTEXT}") == [264, 261]
    # an incomplete marker is ordinary text
    assert 263 not in tiny.encode("<|im_end|")


def test_properties_and_special_flags(tiny: Tokenizer) -> None:
    assert tiny.kind == "bpe (qwen2)"
    assert tiny.vocab_size == 265
    assert tiny.eos_token_id == 263
    assert tiny.stop_token_ids == (261, 263)
    flags = [tiny.is_special(i) for i in (ord("a"), 259, 261, 262, 263, 264)]
    assert flags == [False, False, True, True, True, False]
    assert tiny.token_bytes(ord(" ")) == b" " and tiny.token_bytes(0xE2) == b"\xe2"
    assert tiny.token_bytes(260) == b" w" and tiny.token_bytes(263) == b"<|im_end|>"
    assert tiny.token_text(0xE2) == "\ufffd"
    assert tiny.chat_template == "{{ messages[0].content }}"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tiny.token_bytes(265)


def test_encode_chat_needs_a_template() -> None:
    # the tiny template renders the first message's content only
    assert Tokenizer.from_metadata(tiny_metadata()).encode_chat([{"role": "user", "content": "hello"}]) \
        == [259]
    without = {k: v for k, v in tiny_metadata().items() if k != "tokenizer.chat_template"}
    with pytest.raises(ValueError, match="no tokenizer.chat_template"):
        Tokenizer.from_metadata(without).encode_chat([{"role": "user", "content": "hello"}])


def test_decode_skip_special(tiny: Tokenizer) -> None:
    ids = tiny.encode(f"{IM_START}hello{TOOL_CALL}{IM_END}")
    assert tiny.decode(ids) == f"{IM_START}hello{TOOL_CALL}{IM_END}"
    assert tiny.decode(ids, skip_special=True) == f"hello{TOOL_CALL}"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_inverts_encode_for_any_text(tiny: Tokenizer, text: str) -> None:
    assert tiny.decode(tiny.encode(text)) == text


@pytest.mark.parametrize("key, value, message", [
    ("tokenizer.ggml.model", "llama", "only byte-level BPE"),
    ("tokenizer.ggml.pre", "llama-bpe", "tokenizer.ggml.pre"),
    ("tokenizer.ggml.merges", ["h e", "toolong x y"], r"tokenizer.ggml.merges\[1\]"),
    ("tokenizer.ggml.eos_token_id", 999, "tokenizer.ggml.eos_token_id"),
    ("tokenizer.ggml.token_type", [1, 1], "tokenizer.ggml.token_type"),
    ("tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens"),
])
def test_bad_metadata_raises_value_error_naming_the_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Tokenizer.from_metadata({**tiny_metadata(), key: value})


def test_missing_key_is_named() -> None:
    metadata = tiny_metadata()
    del metadata["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="tokenizer.ggml.merges"):
        Tokenizer.from_metadata(metadata)


def test_from_gguf_reads_the_files_own_metadata(tiny_model_path: Path) -> None:
    # the synthetic GGUF carries the real tokenizer keys when the real model is present, else its own
    tokenizer = Tokenizer.from_gguf(tiny_model_path)
    text = f"{IM_START}user\nhello world 12{IM_END}"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert ids[0] == tokenizer.encode(IM_START)[0] and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.stop_token_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.chat_template and IM_START in tokenizer.chat_template


# --- the real model's tokenizer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(real_model_path: Path) -> Tokenizer:
    return load_tokenizer(str(real_model_path))


@pytest.fixture(scope="module")
def reference() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.real_model
def test_agrees_id_for_id_with_transformers_on_hard_strings(qwen: Tokenizer, reference: dict,
                                                            real_model_path: Path) -> None:
    assert real_model_path.stat().st_size == reference["model_bytes"], "fixture made from another file"
    assert len(reference["strings"]) >= 40
    mismatches = [(case["text"], qwen.encode(case["text"]), case["ids"])
                  for case in reference["strings"] if qwen.encode(case["text"]) != case["ids"]]
    assert mismatches == []


@pytest.mark.real_model
def test_decode_round_trips_the_corpus(qwen: Tokenizer, reference: dict) -> None:
    for case in reference["strings"]:
        assert qwen.decode(case["ids"]) == case["text"]


@pytest.mark.real_model
def test_real_vocabulary_facts(qwen: Tokenizer) -> None:
    assert qwen.vocab_size == 151936
    assert qwen.eos_token_id == 151645
    assert qwen.stop_token_ids == (151643, 151645)
    assert qwen.encode(f"{IM_START}{IM_END}{ENDOFTEXT}{TOOL_CALL}") == [151644, 151645, 151643, 151657]
    assert qwen.is_special(151644) and qwen.is_special(151643) and not qwen.is_special(151657)
    assert qwen.decode([151644, 872, 151645], skip_special=True) == "user"
    assert qwen.chat_template is not None and IM_START in qwen.chat_template
    # a rare CJK character is spelled over several byte pieces that are not UTF-8 on their own
    pieces = qwen.encode("\U0002a6a5")
    assert len(pieces) > 1
    assert b"".join(qwen.token_bytes(i) for i in pieces) == "\U0002a6a5".encode()
    assert "\ufffd" in qwen.token_text(pieces[0])
