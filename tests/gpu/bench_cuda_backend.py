"""Short engine-level benchmark of the CUDA backend (no gRPC): model load, decode tokens/s at
several batch sizes (CUDA graphs + GPU sampling, host loop included), prefill latency.

    python3 tests/gpu/bench_cuda_backend.py MODEL.gguf [--json out.json]
Prints one table; a benchmark, not a test (issue 5 owns the full harness)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_runner import run_batch  # noqa: E402
from gpu_worker.backends.base import SampleRequest  # noqa: E402
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step  # noqa: E402
from gpu_worker.backends.cuda.backend import CudaBackend  # noqa: E402
from gpu_worker.backends.cuda.sampler import pack_sampling  # noqa: E402
from gpu_worker.model.gguf_loader import load_gguf  # noqa: E402
from gpu_worker.sampling.params import SamplingParams  # noqa: E402

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0)


def time_decode(backend, batch: int, prompt_len: int = 32, new_tokens: int = 64) -> float:
    """Tokens/s of greedy decode steps (graph replay + sampling + host loop), prefill excluded."""
    rng = np.random.default_rng(batch)
    prompts = [rng.integers(0, backend.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
    run_batch(backend, prompts, [GREEDY] * batch, 2)  # warm-up of this batch size
    tables = [blocks_for(i * 8, prompt_len + new_tokens, BLOCK) for i in range(batch)]
    out = backend.step(build_step([SequenceChunk(tuple(p), 0, t, _request(0)) for p, t in zip(prompts, tables)],
                                  BLOCK))
    start = time.perf_counter()
    for step in range(1, new_tokens):
        chunks = [SequenceChunk((int(tok),), prompt_len + step - 1, t, _request(step))
                  for tok, t in zip(out.token_ids, tables)]
        out = backend.step(build_step(chunks, BLOCK))
    return batch * (new_tokens - 1) / (time.perf_counter() - start)


def _request(step: int) -> SampleRequest:
    return SampleRequest(GREEDY, step, np.zeros(0, np.int32), np.zeros(0, np.int32))


def time_step_parts(backend, batch: int, repeats: int = 20) -> dict[str, float]:
    """Median ms of the decode graph replay alone and of the sampler alone (greedy / top_p draw),
    right after a time_decode run of this batch size (buffers hold valid inputs)."""
    bucket = backend.graphs.bucket_for(batch)
    parts: dict[str, float] = {}

    def median_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            backend.device.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * float(np.median(times))

    parts["graph_forward_ms"] = median_ms(lambda: backend.graphs.replay(bucket))
    samplings = (("greedy", GREEDY), ("top_p", SamplingParams(temperature=0.8, top_p=0.9)),
                 ("t1", SamplingParams(temperature=1.0)))
    for logits_kind in ("model", "peaked"):
        if logits_kind == "peaked":  # LLM-like rows: a few hundred strong candidates over a noise floor
            rng = np.random.default_rng(0)
            rows = (rng.standard_normal((batch, backend.config.vocab_size)) * 2).astype(np.float32)
            for row in rows:
                row[rng.integers(0, len(row), 300)] += rng.uniform(6, 14, 300).astype(np.float32)
            backend.device.cuda.memcpy_htod(backend.forward.acts.logits.ptr, rows)
        for name, params in samplings:
            req = SampleRequest(params, 1, np.zeros(0, np.int32), np.zeros(0, np.int32))
            packed = pack_sampling(list(range(batch)), [req] * batch, backend.config.vocab_size)
            parts[f"sample_{name}_{logits_kind}_ms"] = median_ms(lambda: backend.sampler.sample(packed))
    return parts


def time_prefill(backend, num_tokens: int, repeats: int = 5) -> float:
    rng = np.random.default_rng(num_tokens)
    prompt = tuple(rng.integers(0, backend.config.vocab_size, num_tokens).tolist())
    step = build_step([SequenceChunk(prompt, 0, blocks_for(0, num_tokens, BLOCK))], BLOCK)
    backend.logits(step)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backend.logits(step)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--fused", action="store_true", help="the fused fp32 forward (QWEN_SERVE_CUDA_FUSED)")
    parser.add_argument("--linear", choices=("mma", "fp32"), help="linear kernels (QWEN_SERVE_CUDA_LINEAR)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    start = time.perf_counter()
    model = load_gguf(args.model)
    backend = CudaBackend(model, max_num_tokens=max(2048, 32 * max(batches)), max_num_seqs=max(batches), max_model_len=2048,
                          fused=args.fused, linear=args.linear)
    load_s = time.perf_counter() - start
    backend.allocate_kv_cache(backend.num_kv_blocks_for_budget(BLOCK, kv_cache_gb=4), BLOCK)
    ready_s = time.perf_counter() - start
    results = {"card": backend.device_name, "model": str(args.model), "load_s": load_s,
               "load_plus_kv_and_graphs_s": ready_s, "weight_bytes": backend.weight_bytes,
               "memory_bytes": backend.memory_bytes, "decode_tok_s": {}, "prefill_ms": {}}
    results["step_parts"] = {}
    for batch in batches:
        results["decode_tok_s"][batch] = time_decode(backend, batch)
        results["step_parts"][batch] = time_step_parts(backend, batch)
    for n in (32, 512, 2048):
        results["prefill_ms"][n] = 1e3 * time_prefill(backend, n)
    backend.close()
    results["fused"], results["linear"] = backend.fused, backend.linear
    forward = f"linear {backend.linear}" + (", fused" if backend.fused else "")
    print(f"\n| card | {results['card']} ({forward} forward) |\n|---|---|")
    print(f"| load (weights upload) | {load_s:.2f} s (+KV + graphs: {ready_s:.2f} s) |")
    print(f"| weight bytes | {backend.weight_bytes:,} |")
    for batch, tps in results["decode_tok_s"].items():
        parts = ", ".join(f"{k} {v:.3f}" for k, v in results["step_parts"][batch].items())
        print(f"| decode batch {batch} | {tps:,.0f} tok/s (per step: {parts}) |")
    for n, ms in results["prefill_ms"].items():
        print(f"| prefill {n} tokens | {ms:.1f} ms ({n / ms * 1e3:,.0f} tok/s) |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
