"""Greedy continuation of one chat prompt on the cpu backend, with the project's own tokenizer,
chat template, loader, reference model and sampler (no server, no HF).

    .venv/bin/python tools/greedy_haiku.py --out docs/haiku_cpu.txt

Stops at <|im_end|> / <|endoftext|> or after --max-tokens (48), as the server does by default.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from gpu_worker.backends.cpu import CpuBackend
from gpu_worker.backends.cpu.sequence_runner import generate
from gpu_worker.model.fetch import default_model_path
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.text.chat_template import render_chat
from gpu_worker.text.tokenizer import Tokenizer

DEFAULT_PROMPT = "Write a haiku about autumn leaves"
BLOCK_SIZE = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", type=Path, help="also write the text and the command here")
    args = parser.parse_args()

    tokenizer = Tokenizer.from_gguf(args.model)
    template = tokenizer.chat_template or ""
    prompt_ids = tokenizer.encode(render_chat(template, [{"role": "user", "content": args.prompt}]))
    model = load_gguf(args.model)
    backend = CpuBackend(model)
    num_tokens = len(prompt_ids) + args.max_tokens
    backend.allocate_kv_cache(num_blocks=-(-num_tokens // BLOCK_SIZE), block_size=BLOCK_SIZE)
    started = time.perf_counter()
    output_ids = generate(backend, prompt_ids, args.max_tokens, stop_token_ids=tokenizer.stop_token_ids,
                          block_size=BLOCK_SIZE)
    seconds = time.perf_counter() - started
    text = tokenizer.decode([t for t in output_ids if t not in tokenizer.stop_token_ids])
    print(text)
    print(f"[{len(prompt_ids)} prompt tokens, {len(output_ids)} generated in {seconds:.1f} s; "
          f"ids {output_ids}]", file=sys.stderr)
    if args.out:
        command = "tools/greedy_haiku.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        args.out.write_text(f"{text}\n\n---\nproduced by: .venv/bin/python {command}\n"
                            f"(cpu backend, greedy, {len(output_ids)} tokens, stop at EOS; "
                            f"model {args.model.name})\n")


if __name__ == "__main__":
    main()
