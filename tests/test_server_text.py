"""Output text: whole characters, hidden end tokens, stop strings across tokens, logging ids."""
from __future__ import annotations

import json
import logging

import pytest

from gpu_worker.text.tokenizer import Tokenizer
from server.logs import JsonFormatter, request_id_var
from server.text import OutputText, TextTools


@pytest.fixture(scope="module")
def tools(tiny_model_path) -> TextTools:
    tokenizer = Tokenizer.from_gguf(str(tiny_model_path))
    return TextTools(tokenizer, tokenizer.chat_template, tokenizer.stop_token_ids)


def _push_all(output: OutputText, ids: list[int]) -> tuple[list[str], str | None]:
    pieces = []
    for token_id in ids:
        text, matched = output.push(token_id)
        pieces.append(text)
        if matched is not None:
            return pieces, matched
    text, matched = output.finish()
    return pieces + [text], matched


def test_multibyte_characters_are_never_split(tools: TextTools) -> None:
    text = "naïve 🍂 leaves — 紅葉"
    ids = tools.tokenizer.encode(text)
    pieces, matched = _push_all(OutputText(tools, (), frozenset()), ids)
    assert "".join(pieces) == text and matched is None
    assert all("\ufffd" not in piece for piece in pieces)


def test_end_tokens_are_not_rendered(tools: TextTools) -> None:
    ids = tools.tokenizer.encode("Hi") + [tools.eos_token_ids[0]]
    pieces, _ = _push_all(OutputText(tools, (), frozenset(tools.eos_token_ids)), ids)
    assert "".join(pieces) == "Hi"


def test_stop_string_spanning_tokens_ends_the_text_before_it(tools: TextTools) -> None:
    text = "The autumn leaves fall down slowly"
    ids = tools.tokenizer.encode(text)
    pieces, matched = _push_all(OutputText(tools, ("ves fa",), frozenset()), ids)
    assert matched == "ves fa" and "".join(pieces) == "The autumn lea"


def test_ids_beyond_the_tokenizer_show_a_replacement_character(tools: TextTools) -> None:
    output = OutputText(tools, (), frozenset())
    pieces, _ = _push_all(output, tools.tokenizer.encode("ok") + [tools.tokenizer.vocab_size + 5])
    assert "".join(pieces) == "ok\ufffd"


def test_json_logs_carry_the_request_id(caplog: pytest.LogCaptureFixture) -> None:
    token = request_id_var.set("req-42")
    try:
        with caplog.at_level(logging.INFO, logger="qwen_serve"):
            logging.getLogger("qwen_serve.test").info("hello", extra={"fields": {"n": 3}})
    finally:
        request_id_var.reset(token)
    line = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert (line["request_id"], line["msg"], line["n"], line["level"]) == ("req-42", "hello", 3, "info")
