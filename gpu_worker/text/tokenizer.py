"""Qwen2 byte-level BPE tokenizer built from GGUF metadata with the `tokenizers` library.

The GGUF carries the vocabulary (`tokenizer.ggml.tokens`, spelled in GPT-2's byte-to-unicode
alphabet), the merges (`"Ġ t"` strings, best first) and a type per token (1 normal, 3 control,
4 user-defined, 5 unused). Like llama.cpp and transformers' GGUF loader there is no normalizer (no
NFC), no BOS, and control + user-defined tokens are matched whole wherever they appear in text.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 split (= Qwen2's tokenizer.json): single digits, letters
# with one leading non-letter, punctuation runs, newline runs, whitespace runs.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = ("qwen2",)
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
ENDOFTEXT = "<|endoftext|>"

_KEY_MODEL = "tokenizer.ggml.model"
_KEY_PRE = "tokenizer.ggml.pre"
_KEY_TOKENS = "tokenizer.ggml.tokens"
_KEY_MERGES = "tokenizer.ggml.merges"
_KEY_TYPES = "tokenizer.ggml.token_type"
_KEY_EOS = "tokenizer.ggml.eos_token_id"
_KEY_TEMPLATE = "tokenizer.chat_template"


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (printable Latin-1 map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    next_codepoint = 256
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(next_codepoint)
            next_codepoint += 1
    return mapping


def _spell_in_byte_alphabet(token: str, unicode_to_byte: Mapping[str, int]) -> str:
    """Tokens already in the byte alphabet stay; any other spelling is re-spelled from its UTF-8."""
    if all(char in unicode_to_byte for char in token):
        return token
    alphabet = byte_to_unicode()
    return "".join(alphabet[byte] for byte in token.encode("utf-8"))


def _require(metadata: Mapping[str, Any], key: str) -> Any:
    if key not in metadata:
        raise ValueError(f"tokenizer metadata is missing required key {key!r}")
    return metadata[key]


def _read_gguf_metadata(path: str) -> Mapping[str, Any]:
    """The file's metadata as plain python values (GGUFLoadError names the file and field)."""
    from gpu_worker.model.gguf_loader import load_gguf

    with load_gguf(path) as model:
        return dict(model.metadata)


class Tokenizer:
    """Text <-> token ids for Qwen2-family GGUF models (see module docstring)."""

    kind = "bpe (qwen2)"

    def __init__(self, tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int],
                 eos_token_id: int, chat_template: str | None = None) -> None:
        if not tokens:
            raise ValueError(f"{_KEY_TOKENS} is empty")
        if len(token_types) != len(tokens):
            raise ValueError(f"{_KEY_TYPES} has {len(token_types)} entries for {len(tokens)} tokens")
        if not (0 <= eos_token_id < len(tokens)):
            raise ValueError(f"{_KEY_EOS} {eos_token_id} is outside the vocabulary [0, {len(tokens)})")
        unicode_to_byte = {char: byte for byte, char in byte_to_unicode().items()}
        spelled = [_spell_in_byte_alphabet(token, unicode_to_byte) for token in tokens]
        self._token_types = tuple(int(t) for t in token_types)
        # Raw bytes of each token: control/user-defined tokens are their literal UTF-8 text.
        self._token_bytes = tuple(
            token.encode("utf-8") if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
            else bytes(unicode_to_byte[char] for char in spelling)
            for token, spelling, kind in zip(tokens, spelled, self._token_types, strict=True)
        )
        self._backend = self._build_backend(tokens, spelled, merges, self._token_types)
        self._eos_token_id = int(eos_token_id)
        self._chat_template = chat_template
        endoftext = [i for i, token in enumerate(tokens) if token == ENDOFTEXT]
        self._stop_token_ids = tuple(sorted({self._eos_token_id, *endoftext}))

    @staticmethod
    def _build_backend(tokens: Sequence[str], spelled: Sequence[str], merges: Sequence[str],
                       token_types: Sequence[int]) -> BackendTokenizer:
        vocab = {spelling: index for index, spelling in enumerate(spelled)}
        if len(vocab) != len(spelled):
            raise ValueError(f"{_KEY_TOKENS} contains duplicate tokens")
        merge_pairs = []
        for index, merge in enumerate(merges):
            parts = merge.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{_KEY_MERGES}[{index}] is not two space-separated tokens: {merge!r}")
            merge_pairs.append((parts[0], parts[1]))
        backend = BackendTokenizer(
            models.BPE(vocab=vocab, merges=merge_pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        backend.decoder = decoders.ByteLevel()
        specials = [AddedToken(token, special=kind == TOKEN_TYPE_CONTROL, normalized=False)
                    for token, kind in zip(tokens, token_types, strict=True)
                    if kind in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)]
        backend.add_special_tokens([t for t in specials if t.special])
        backend.add_tokens([t for t in specials if not t.special])
        return backend

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """Build from GGUF metadata given as plain python values (lists of str / int)."""
        model = _require(metadata, _KEY_MODEL)
        if model != "gpt2":
            raise ValueError(f"{_KEY_MODEL} is {model!r}; only byte-level BPE ('gpt2') is supported")
        pre = metadata.get(_KEY_PRE, "qwen2")
        if pre not in SUPPORTED_PRE_TOKENIZERS:
            raise ValueError(f"{_KEY_PRE} is {pre!r}; supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)}")
        tokens = list(_require(metadata, _KEY_TOKENS))
        token_types = list(metadata.get(_KEY_TYPES) or [TOKEN_TYPE_NORMAL] * len(tokens))
        return cls(tokens=tokens, merges=list(_require(metadata, _KEY_MERGES)), token_types=token_types,
                   eos_token_id=int(_require(metadata, _KEY_EOS)),
                   chat_template=metadata.get(_KEY_TEMPLATE))

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Build from a GGUF file's metadata (read through the project's loader)."""
        return cls.from_metadata(_read_gguf_metadata(os.fspath(path)))

    @property
    def vocab_size(self) -> int:
        return len(self._token_bytes)

    @property
    def eos_token_id(self) -> int:
        return self._eos_token_id

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end generation unless ignore_eos: EOS (<|im_end|>) and <|endoftext|>."""
        return self._stop_token_ids

    @property
    def chat_template(self) -> str | None:
        """The file's own `tokenizer.chat_template` (None when absent)."""
        return self._chat_template

    def _check_id(self, token_id: int) -> int:
        if not (0 <= token_id < len(self._token_bytes)):
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {len(self._token_bytes)})")
        return token_id

    def is_special(self, token_id: int) -> bool:
        """Control tokens (<|im_start|>, <|im_end|>, <|endoftext|>, ...): dropped by skip_special."""
        return self._token_types[self._check_id(token_id)] == TOKEN_TYPE_CONTROL

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token (may be part of a UTF-8 character)."""
        return self._token_bytes[self._check_id(token_id)]

    def token_text(self, token_id: int) -> str:
        """One token as text, a partial UTF-8 character shown as U+FFFD (TokenizeResponse.pieces)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        """Text -> ids; special tokens written in the text become their single ids; no BOS."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Messages rendered with the file's own chat template, then encoded (ValueError for bad
        roles/contents or a file without a template)."""
        from gpu_worker.text.chat_template import render_chat

        if self._chat_template is None:
            raise ValueError(f"the model file has no {_KEY_TEMPLATE}; send a raw prompt instead")
        return self.encode(render_chat(self._chat_template, messages, add_generation_prompt, tools))

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        return b"".join(self.token_bytes(int(i)) for i in ids
                        if not (skip_special and self.is_special(int(i))))

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD (one per maximal invalid subpart)."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", errors="replace")


@lru_cache(maxsize=4)
def load_tokenizer(path: str) -> Tokenizer:
    """One shared Tokenizer per GGUF path (it is immutable; building one reads ~5 MB of metadata)."""
    return Tokenizer.from_gguf(path)
