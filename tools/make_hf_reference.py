"""Record an independent reference for the numpy model: HF transformers on the CPU, same GGUF.

For each chat prompt (HF's own tokenizer + chat template from the GGUF), HF greedily generates a
64-token continuation (EOS suppressed so that it is always 64 tokens); then one teacher-forced
float32 forward over prompt + continuation records, at every position: the top-20 ids and logits,
the logit max/min, the argmax and the top-1/top-2 margin. Output: a compact .npz that
tests/test_reference_model.py replays through gpu_worker.model.qwen2_reference.

Usage (needs the `reference` extra: transformers + torch; ~3 min, ~6 GB RAM on 2 cores):
    .venv/bin/python tools/make_hf_reference.py \
        --model ~/.cache/qwen-serve/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \
        --out tests/fixtures/hf_reference_q4_k_m.npz
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

PROMPTS: tuple[tuple[tuple[str, str], ...], ...] = (
    (("user", "Write a haiku about autumn leaves"),),
    (("user", "Explain what a hash map is and when to use one."),),
    (("user", "Write a Python function that checks whether a number is prime."),),
    (("user", "Translate 'good morning, how are you?' into French, German and Japanese."),),
    (("system", "You are a terse assistant."), ("user", "What is 17 * 23? Show your work step by step.")),
    (("user", "用三句话介绍一下长城。"),),
)
NUM_CONTINUATION = 64
TOP_N = 20


def load_hf(model_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    kwargs = {"gguf_file": model_path.name}
    tokenizer = AutoTokenizer.from_pretrained(model_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(model_path.parent, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()


def record_prompt(tokenizer, model, messages) -> dict[str, np.ndarray]:
    """Greedy continuation + teacher-forced logits summary for one chat."""
    import torch

    chat = [{"role": role, "content": content} for role, content in messages]
    prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(prompt_ids, torch.Tensor):   # newer transformers return a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    with torch.no_grad():
        generated = model.generate(prompt_ids, do_sample=False, max_new_tokens=NUM_CONTINUATION,
                                   min_new_tokens=NUM_CONTINUATION)
        logits = model(generated).logits[0].float().numpy()          # [num_tokens, vocab]
    order = np.argsort(-logits, axis=-1, kind="stable")[:, :TOP_N]    # ties to the lowest id
    top_logits = np.take_along_axis(logits, order, axis=-1)
    return {
        "token_ids": generated[0].numpy().astype(np.int32),
        "prompt_len": np.int32(prompt_ids.shape[1]),
        "top_ids": order.astype(np.int32),
        "top_logits": top_logits.astype(np.float32),
        "logit_max": logits.max(axis=-1).astype(np.float32),
        "logit_min": logits.min(axis=-1).astype(np.float32),
        "argmax": order[:, 0].astype(np.int32),
        "margin": (top_logits[:, 0] - top_logits[:, 1]).astype(np.float32),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import transformers

    tokenizer, model = load_hf(args.model.expanduser())
    arrays: dict[str, np.ndarray] = {}
    for i, messages in enumerate(PROMPTS):
        started = time.perf_counter()
        record = record_prompt(tokenizer, model, messages)
        arrays.update({f"p{i}_{key}": value for key, value in record.items()})
        print(f"prompt {i}: {record['prompt_len']} prompt + {NUM_CONTINUATION} tokens, "
              f"{time.perf_counter() - started:.1f} s: "
              f"{tokenizer.decode(record['token_ids'][record['prompt_len']:])!r}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    arrays["num_prompts"] = np.int32(len(PROMPTS))
    arrays["provenance"] = np.array(f"transformers {transformers.__version__}, {args.model.name}, "
                                    f"float32 CPU, made at commit {commit.strip()}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
