"""Write tests/fixtures/tokenizer_reference.json: token ids for a corpus of hard strings and rendered
chat prompts, produced by an independent implementation -- transformers' own GGUF tokenizer
(`AutoTokenizer.from_pretrained(dir, gguf_file=name)`) -- so that CI can check our tokenizer and
chat template id-for-id without transformers installed.

Usage:  .venv/bin/python tools/make_tokenizer_fixtures.py [--model PATH] [--out PATH]
Needs the `reference` extra (transformers, torch).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

DEFAULT_MODEL = Path.home() / ".cache/qwen-serve/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/tokenizer_reference.json"

# Each string stresses one part of the pipeline: the split regex (contractions, digits, whitespace
# runs, punctuation runs), byte-level BPE on multi-byte UTF-8, and special tokens written in text.
HARD_STRINGS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they've done what we'd said, isn't it? It's JOHN'S, YOU'RE, WE'LL, She'D",
    "Don't DON'T don\u2019t 'quoted' ''double''",
    "   leading spaces",
    "trailing spaces   ",
    "a  b   c    d     e",
    "tabs\tand\t\tmore\t\t\ttabs",
    "\n\n\nnewlines\n \n\t\n",
    "\r\nWindows\r\nline endings\r\n\r\n",
    "     \n     \n  \t  \n",
    "\t    \t x = 1",
    "1234567890 3.14159 -42 1,000,000 0x1F 1e-9",
    "00000000001111111111222",
    "\u0661\u0662\u0663 \u2167 \u00bd \u00b2\u00b3",
    "\u4f60\u597d\uff0c\u4e16\u754c\uff01\u4eca\u5929\u5929\u6c14\u5f88\u597d\u3002",
    "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca\u3001\u3072\u3089\u304c\u306a",
    "\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4",
    "\U00020000\U00020001\U0002a6a5 rare CJK extension B",
    "abc\u4e2d\u6587def123ghi\u65e5\u672c",
    "Emoji: \U0001F600\U0001F44D\U0001F3FD \U0001F468\u200d\U0001F469\u200d\U0001F467\u200d\U0001F466",
    "\U0001F3F3\ufe0f\u200d\U0001F308 \u2764\ufe0f\u200d\U0001F525 \U0001F9D1\U0001F3FF\u200d\U0001F4BB",
    "\U0001F1FA\U0001F1F8\U0001F1EF\U0001F1F5 1\ufe0f\u20e3 #\ufe0f\u20e3",
    "\U0001F600\U0001F600\U0001F600",
    "e\u0301 a\u0308 n\u0303 o\u0302\u0323 (decomposed)",
    "Z\u0351\u0362a\u0344\u0300l\u0363\u0489g\u0306\u0336o\u0358",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u00c5ngstr\u00f6m (precomposed)",
    "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5 \u00e0\u00e1\u00e2\u00e3\u00e4\u00e5 \u00df \u1e9e \ufb01 \ufb00",
    "\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645",
    "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",
    "\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e",
    "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35\u0e0a\u0e32\u0e27\u0e42\u0e25\u0e01",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0401\u0451",
    "\u0393\u03b5\u03b9\u03ac \u03c3\u03bf\u03c5 \u039a\u03cc\u03c3\u03bc\u03b5",
    "\uff21\uff22\uff23\uff11\uff12\uff13 full width",
    "\u00a0nbsp\u2003em\u3000ideographic\u2028line\u2029para",
    "zero\u200bwidth\u200cnon\u200djoiner\ufeffbom",
    "\x00\x01\x7f bell\x07 esc\x1b[0m",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "int main(void) {\n\tprintf(\"%d\\n\", x->y[0] << 2);\n\treturn 0;\n}\n",
    '{"key": [1, 2.5e-3, null, true], "nested": {"a": "b"}}',
    "<div class=\"x\">&amp; &lt;tag&gt;</div>",
    "# Title\n\n- item 1\n- item 2\n\n```python\nprint('hi')\n```\n",
    "https://example.com/path?query=1&b=2#frag user@example.org",
    "\u2200x\u2208\u211d: x\u00b2 \u2265 0, \u2211_{i=1}^{n} i = n(n+1)/2",
    "!!!???...---___===+++***///\\\\\\",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><|endoftext|>text<|im_end|>",
    "Hello<|im_end|>world",
    "<|fim_prefix|>def f():<|fim_suffix|>\n<|fim_middle|>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<|im_start| <|im_end |> <im_end> <|IM_END|> |>",
    " ",
    "\n",
    "a",
    "",
    "In 2024, the model's accuracy rose from 71.3% to 84.9% \u2014 a 13.6-point gain (p < 0.001).",
]

CONVERSATIONS = [
    ([{"role": "system", "content": "You are a helpful assistant."},
      {"role": "user", "content": "Write a haiku about autumn leaves"}], True),
    ([{"role": "user", "content": "What is 2 + 2?"}], True),
    ([{"role": "system", "content": "R\u00e9ponds en fran\u00e7ais. \U0001F600"},
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Bonjour !"},
      {"role": "user", "content": "<b>tags</b> & \u4e2d\u6587\n\ttab"}], True),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], False),
    ([{"role": "user", "content": "Weather?"},
      {"role": "tool", "content": "{\"temp\": 21}"},
      {"role": "tool", "content": "{\"rain\": false}"}], True),
]


def _one_entry_per_line(fixture: dict) -> str:
    """JSON with one corpus entry per line: reviewable diffs, no line per id."""
    lines = ["{"]
    for key, value in fixture.items():
        if isinstance(value, list):
            entries = ",\n".join("  " + json.dumps(entry, ensure_ascii=True) for entry in value)
            lines.append(f"{json.dumps(key)}: [\n{entries}\n ],")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value, ensure_ascii=True)},")
    lines[-1] = lines[-1].rstrip(",")
    return "\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("QWEN_SERVE_MODEL", str(DEFAULT_MODEL)))
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    import transformers
    from transformers import AutoTokenizer

    model = Path(args.model)
    reference = AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    strings = [{"text": text, "ids": reference.encode(text, add_special_tokens=False)}
               for text in HARD_STRINGS]
    chats = []
    for messages, add_generation_prompt in CONVERSATIONS:
        rendered = reference.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        chats.append({"messages": messages, "add_generation_prompt": add_generation_prompt,
                      "rendered": rendered, "ids": reference.encode(rendered, add_special_tokens=False)})
    fixture = {
        "reference": f"transformers {transformers.__version__} AutoTokenizer(gguf_file=...)",
        "model_file": model.name,
        "model_bytes": model.stat().st_size,
        "strings": strings,
        "chats": chats,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(_one_entry_per_line(fixture))
    print(f"wrote {args.out}: {len(strings)} strings, {len(chats)} chats")


if __name__ == "__main__":
    main()
