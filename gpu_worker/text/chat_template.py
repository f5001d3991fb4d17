"""Render chat messages with the model's own jinja2 `tokenizer.chat_template`.

The environment mirrors the one transformers' `apply_chat_template` gives templates, since model
templates are written against it: a sandbox (templates come from model files), `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that keeps non-ASCII text as is,
`raise_exception(msg)` and `strftime_now(fmt)`. A template's own `raise_exception` and any template
error surface as ValueError (a bad request or a bad template, never a crash).
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

ALLOWED_ROLES = ("system", "user", "assistant", "tool")


class TemplateRaisedError(Exception):
    """Raised by a template's own `raise_exception(...)`."""


def _raise_exception(message: str) -> None:
    raise TemplateRaisedError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Not jinja's built-in tojson: that one HTML-escapes <, >, & and ' which would alter prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Plain-dict copies of `messages`; ValueError naming the first bad message and field."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{role, content}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must contain at least one message")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise ValueError(f"messages[{index}].role {role!r} is not one of {', '.join(ALLOWED_ROLES)}")
        content = message.get("content", "")
        if not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string, got {type(content).__name__}")
        checked.append({**message, "content": content})
    return checked


def render_chat(template: str, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                tools: Sequence[Mapping[str, Any]] | None = None, **extra_context: Any) -> str:
    """The prompt text for `messages` (tokenize it with special tokens parsed; no BOS is added).

    messages: [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]
    tools: optional JSON-schema function descriptions, passed to the template as `tools`.
    """
    if not isinstance(template, str) or not template.strip():
        raise ValueError("the model has no chat template (tokenizer.chat_template is empty)")
    checked = validate_messages(messages)
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"chat template does not compile: {error} (line {error.lineno})") from error
    try:
        return compiled.render(messages=checked, add_generation_prompt=add_generation_prompt,
                               tools=list(tools) if tools else None, **extra_context)
    except TemplateRaisedError as error:
        raise ValueError(f"chat template rejected the messages: {error}") from error
    except (jinja2.TemplateError, TypeError) as error:
        raise ValueError(f"chat template failed to render: {error}") from error
