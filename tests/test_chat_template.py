"""Chat template rendering: the jinja2 environment HF templates expect, role validation, and the
model's own template against the known Qwen2.5 format and transformers' apply_chat_template."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_worker.text.chat_template import render_chat
from gpu_worker.text.tokenizer import Tokenizer, load_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "tokenizer_reference.json"
SIMPLE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
          "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_simple_template_with_generation_prompt_switch() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat(SIMPLE, messages) == "<system>S\n<user>U\n<assistant>"
    assert render_chat(SIMPLE, messages, add_generation_prompt=False) == "<system>S\n<user>U\n"


def test_tojson_keeps_text_verbatim_and_tools_reach_the_template() -> None:
    template = "{% for t in tools %}{{ t | tojson }}{% endfor %}|{{ messages[0] | tojson(indent=1) }}"
    tools = [{"name": "f", "description": "<b>\u00fc & 'q'"}]
    rendered = render_chat(template, [{"role": "user", "content": "\u4e2d"}], tools=tools)
    assert rendered == ('{"name": "f", "description": "<b>\u00fc & \'q\'"}'
                        '|{\n "role": "user",\n "content": "\u4e2d"\n}')


def test_trim_blocks_lstrip_blocks_and_loop_controls() -> None:
    template = ("  {% for m in messages %}\n"
                "{% if m.role == 'system' %}{% continue %}{% endif %}"
                "{{ m.content }}{% if loop.index > 2 %}{% break %}{% endif %}\n"
                "  {% endfor %}\n")
    messages = [{"role": r, "content": c} for r, c in
                [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")]]
    # lstrip_blocks drops the indentation before block tags and trim_blocks the newline after them
    # (without them: "  \n\na\n  \nb"); continue skips the system turn, break stops after "b"
    assert render_chat(template, messages) == "ab"


def test_raise_exception_in_template_is_a_value_error() -> None:
    template = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok"
    assert render_chat(template, [{"role": "user", "content": ""}]) == "ok"
    with pytest.raises(ValueError, match="first must be user"):
        render_chat(template, [{"role": "assistant", "content": ""}])


@pytest.mark.parametrize("messages, message", [
    ([{"role": "bot", "content": "x"}], r"messages\[0\].role 'bot'"),
    ([{"role": "user", "content": "x"}, {"content": "y"}], r"messages\[1\].role None"),
    ([{"role": "user", "content": 3}], r"messages\[0\].content must be a string"),
    ([], "at least one message"),
    (["user: hi"], r"messages\[0\] must be a dict"),
])
def test_bad_messages_raise_value_error_naming_the_field(messages: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        render_chat(SIMPLE, messages)


def test_bad_or_unsafe_templates_raise_value_error() -> None:
    with pytest.raises(ValueError, match="no chat template"):
        render_chat("", [{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        render_chat("{% for %}", [{"role": "user", "content": "x"}])
    # the sandbox refuses attribute access to python internals
    with pytest.raises(ValueError, match="failed to render"):
        render_chat("{{ messages.__class__.__mro__[1].__subclasses__() }}",
                    [{"role": "user", "content": "x"}])


# --- the model's own template --------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen(real_model_path: Path) -> Tokenizer:
    return load_tokenizer(str(real_model_path))


@pytest.mark.real_model
def test_system_and_user_render_in_the_qwen25_format(qwen: Tokenizer) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}]
    assert qwen.chat_template is not None
    assert render_chat(qwen.chat_template, messages) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n")


@pytest.mark.real_model
def test_default_system_prompt_when_none_is_given(qwen: Tokenizer) -> None:
    assert qwen.chat_template is not None
    rendered = render_chat(qwen.chat_template, [{"role": "user", "content": "Hi"}],
                           add_generation_prompt=False)
    assert rendered == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
                        "assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


@pytest.mark.real_model
def test_matches_transformers_apply_chat_template(qwen: Tokenizer) -> None:
    assert qwen.chat_template is not None
    for case in json.loads(FIXTURE.read_text())["chats"]:
        rendered = render_chat(qwen.chat_template, case["messages"], case["add_generation_prompt"])
        assert rendered == case["rendered"]
        assert qwen.encode(rendered) == case["ids"]


@pytest.mark.real_model
def test_encode_chat_is_render_then_encode(qwen: Tokenizer) -> None:
    case = json.loads(FIXTURE.read_text())["chats"][0]
    assert qwen.encode_chat(case["messages"], case["add_generation_prompt"]) == case["ids"]
    with pytest.raises(ValueError, match="role 'robot'"):
        qwen.encode_chat([{"role": "robot", "content": "beep"}])


@pytest.mark.real_model
def test_tools_are_listed_in_the_system_turn(qwen: Tokenizer) -> None:
    assert qwen.chat_template is not None
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"city": "<str>"}}}
    rendered = render_chat(qwen.chat_template, [{"role": "user", "content": "Paris?"}], tools=[tool])
    assert "<tools>\n" + json.dumps(tool, ensure_ascii=False) + "\n</tools>" in rendered
    assert rendered.endswith("<|im_start|>user\nParis?<|im_end|>\n<|im_start|>assistant\n")
