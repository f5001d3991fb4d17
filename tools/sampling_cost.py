"""Batch-1 decode steps on the cuda backend by sampling setting: the median and worst time of
backend.step (forward graph, GPU sampler, read-back) over 47 steps of one chat prompt, and the
text. Run on the GPU machine: `python tools/sampling_cost.py MODEL.gguf`. A benchmark, not a test.

The sampler decides most draws on the sorted head of the distribution; a draw that falls past it
(flat distributions: high temperatures, random weights) takes the bisection fallback, ~100 passes
over the vocabulary on one block (milliseconds)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_worker.backends.base import SampleRequest
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, build_step
from gpu_worker.backends.cuda.backend import CudaBackend
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.sampling.params import SamplingParams
from gpu_worker.text.chat_template import render_chat
from gpu_worker.text.tokenizer import Tokenizer

SETTINGS = (("greedy", SamplingParams(temperature=0.0)),
            ("t=0.7 top_p=0.9", SamplingParams(temperature=0.7, top_p=0.9, seed=1)),
            ("t=1", SamplingParams(temperature=1.0, seed=1)), ("t=1.5", SamplingParams(temperature=1.5, seed=1)))
BLOCK, STEPS = 16, 48


def main() -> None:
    path = sys.argv[1]
    tok = Tokenizer.from_gguf(path)
    messages = [{"role": "user", "content": "Write a haiku about autumn leaves"}]
    ids = tok.encode(render_chat(tok.chat_template or "", messages))
    backend = CudaBackend(load_gguf(path), max_num_tokens=512, max_num_seqs=8, max_model_len=1024)
    backend.allocate_kv_cache(64, BLOCK)
    table = tuple(range(64))
    for name, params in SETTINGS:
        seq = list(ids)

        def request(step: int, seq=seq, params=params) -> SampleRequest:
            return SampleRequest(params, step, np.asarray(seq, np.int32), np.zeros(0, np.int32))

        out = backend.step(build_step([SequenceChunk(tuple(seq), 0, table, sample=request(0))], BLOCK))
        seq.append(int(out.token_ids[0]))
        times = []
        for step in range(1, STEPS):
            batch = build_step([SequenceChunk((seq[-1],), len(seq) - 1, table, sample=request(step))], BLOCK)
            backend.device.synchronize()
            started = time.perf_counter()
            out = backend.step(batch)
            times.append(time.perf_counter() - started)
            seq.append(int(out.token_ids[0]))
        text = tok.decode(seq[len(ids):])[:60].replace("\n", " ")
        print(f"{name:16s} step median {1e3 * np.median(times):.3f} ms, max {1e3 * max(times):.3f} ms | {text!r}")
    backend.close()


if __name__ == "__main__":
    main()
