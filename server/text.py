"""The front-end's text side: prompt → token ids (plain, chat template, or given ids) and the
per-request output text state (incremental detokenizer + stop strings).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from gpu_worker.text.chat_template import render_chat
from gpu_worker.text.detokenizer import IncrementalDetokenizer
from gpu_worker.text.tokenizer import Tokenizer
from server.requests import ClientRequest, InputKind
from server.stop_strings import StopStringMatcher


@dataclass(frozen=True)
class TextTools:
    """The model's tokenizer and chat template; shared by all requests (read-only)."""

    tokenizer: Tokenizer
    chat_template: str | None
    # Tokens that end generation are never rendered as text (their literal "<|im_end|>" is markup).
    eos_token_ids: tuple[int, ...]

    def prompt_ids(self, request: ClientRequest) -> list[int]:
        if request.input_kind is InputKind.TOKEN_IDS:
            return list(request.token_ids)
        if request.input_kind is InputKind.CHAT:
            return self.tokenizer.encode(self.render(request))
        return self.tokenizer.encode(request.prompt)

    def render(self, request: ClientRequest) -> str:
        if self.chat_template is None:
            raise ValueError("the model file has no chat template; send a prompt or token ids")
        messages = [{"role": role, "content": content} for role, content in request.messages]
        return render_chat(self.chat_template, messages, add_generation_prompt=request.add_generation_prompt)

    def piece(self, token_id: int) -> str:
        """One token's text for display (a partial UTF-8 character shows as U+FFFD)."""
        if not 0 <= token_id < self.tokenizer.vocab_size:
            return "\ufffd"   # a model row without a tokenizer entry (padded embedding)
        return self.tokenizer.token_text(token_id)


@dataclass
class OutputText:
    """Token ids in, text deltas out: whole UTF-8 characters, stop strings held back and cut."""

    tools: TextTools
    stops: tuple[str, ...]
    hidden_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer = field(init=False)
    matcher: StopStringMatcher = field(init=False)

    vocab_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.detokenizer = IncrementalDetokenizer(self.tools.tokenizer)
        self.matcher = StopStringMatcher(self.stops)
        self.vocab_size = self.tools.tokenizer.vocab_size     # read once, not per token

    def push(self, token_id: int) -> tuple[str, str | None]:
        """(text to emit, matched stop string or None)."""
        if token_id in self.hidden_ids:
            piece = ""
        elif 0 <= token_id < self.vocab_size:
            piece = self.detokenizer.push(token_id)
        else:   # a model row without a tokenizer entry (padded embedding): shown, not fatal
            piece = self.detokenizer.flush() + "\ufffd"
            self.detokenizer = IncrementalDetokenizer(self.tools.tokenizer)
        match = self.matcher.push(piece)
        return match.emit, match.matched

    def finish(self) -> tuple[str, str | None]:
        """At the end of generation: the detokenizer's tail, then whatever the matcher held back."""
        match = self.matcher.push(self.detokenizer.flush())
        if match.matched is not None:
            return match.emit, match.matched
        return match.emit + self.matcher.flush(), None
