"""Engine-level benchmark (no gRPC) of one GGUF on the cuda or cpu backend; writes JSON.

    python -m benchmarks.engine_bench MODEL.gguf --backend cuda --json out.json [--quick]

Measures (issue 5): model load seconds; weight bytes and KV bytes per 1k tokens (the backend's
own accounting); steady-state greedy decode tok/s per batch size (~128-token prompts); prefill
latency and tok/s per prompt length; the aggregate test (256 requests, 128-token prompts + 128
new tokens, output tok/s). Every section has a time budget; a failed section is recorded and the
others still run. The JSON is rewritten after each section.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, ResultFile, parse_int_list
from benchmarks.engine_measures import (
    each_within_budget,
    measure_aggregate,
    measure_decode,
    measure_prefill,
)

SECTIONS = ("decode", "step_parts", "prefill", "aggregate")
STEP_PARTS_BATCHES = (1, 64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engine_bench", description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path, help="GGUF file")
    p.add_argument("--backend", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--label", default="", help="name of this model variant in the report (e.g. q4_k_m, f16)")
    p.add_argument("--json", type=Path, help="write results here")
    p.add_argument("--batches", default="1,8,32,64,128,256", help="decode batch sizes")
    p.add_argument("--prefill", default="32,512,2048", help="prefill prompt lengths")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length for the decode runs")
    p.add_argument("--decode-steps", type=int, default=64, help="timed decode steps per batch size")
    p.add_argument("--warmup-steps", type=int, default=4, help="untimed decode steps first")
    p.add_argument("--prefill-repeats", type=int, default=3)
    p.add_argument("--agg-seqs", type=int, default=256, help="aggregate test: concurrent requests")
    p.add_argument("--agg-prompt", type=int, default=128, help="aggregate test: prompt tokens")
    p.add_argument("--agg-new", type=int, default=128, help="aggregate test: new tokens each")
    p.add_argument("--budget-s", type=float, default=60.0, help="time budget per section (s)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-tokens-per-step", type=int, default=2048,
                   help="engine token budget per step (>= the largest batch; longer prefills are chunked)")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="default: what the runs need")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    if p.parse_known_args(argv)[0].quick:   # quick sizes replace the defaults; explicit flags still win
        p.set_defaults(batches="1,2", prefill="8,32", prompt_len=16, decode_steps=3, warmup_steps=1,
                       prefill_repeats=1, agg_seqs=4, agg_prompt=8, agg_new=4)
    args = p.parse_args(argv)
    args.batch_list, args.prefill_list = parse_int_list(args.batches), parse_int_list(args.prefill)
    args.skip_set = {s for s in args.skip.split(",") if s}
    unknown = args.skip_set - set(SECTIONS)
    if unknown:
        p.error(f"unknown --skip section(s): {', '.join(sorted(unknown))}")
    for name in ("prompt_len", "decode_steps", "prefill_repeats", "agg_seqs", "agg_prompt", "agg_new",
                 "block_size", "max_tokens_per_step"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    return args


def engine_sizes(args: argparse.Namespace) -> tuple[int, int, int]:
    """(max_batch, max_tokens_per_step, kv tokens needed) for the sections that will run."""
    max_batch = max([*args.batch_list, args.agg_seqs if "aggregate" not in args.skip_set else 1])
    max_tokens_per_step = max(args.max_tokens_per_step, max_batch)
    decode_tokens = max(args.batch_list) * (args.prompt_len + decode_max_tokens(args, max(args.batch_list))
                                            + args.block_size)
    agg_tokens = args.agg_seqs * (args.agg_prompt + args.agg_new + args.block_size)
    kv_tokens = max(decode_tokens, agg_tokens, max(args.prefill_list) + 2 * args.block_size)
    return max_batch, max_tokens_per_step, kv_tokens


def decode_max_tokens(args: argparse.Namespace, batch: int) -> int:
    """max_tokens of a decode-run request: it must outlive the timed steps even when it was the
    first of `batch` prompts prefilled over up to `batch` steps (and decoding meanwhile)."""
    return args.warmup_steps + args.decode_steps + 2 + batch


def load_engine(args: argparse.Namespace) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(model, backend, engine, load measures): load and weight upload timed apart from KV
    allocation + graph capture + the worker's warm-up request."""
    from gpu_worker.backends.factory import create_backend
    from gpu_worker.model.gguf_loader import load_gguf
    from gpu_worker.worker_main import create_engine, quant_type_counts, warm_up

    max_batch, max_tokens_per_step, kv_tokens = engine_sizes(args)
    started = time.perf_counter()
    model = load_gguf(args.model)
    # cuda: static step buffers and decode graphs sized for the largest step of this run
    options = {} if args.backend == "cpu" else {"max_num_tokens": max_tokens_per_step,
                                                "max_num_seqs": max_batch}
    backend = create_backend(args.backend, model, **options)
    load_s = time.perf_counter() - started
    block_bytes = backend.kv_bytes_per_block(args.block_size)
    if args.kv_cache_gb is not None:
        num_blocks = int(args.kv_cache_gb * 2**30) // block_bytes
    else:
        num_blocks = -(-kv_tokens // args.block_size) + 8
    engine = create_engine(model, backend, num_blocks, args.block_size, max_batch, max_tokens_per_step)
    warm_up(engine)
    ready_s = time.perf_counter() - started
    memory = getattr(backend, "memory_bytes", None)
    return model, backend, engine, {
        "load_s": load_s, "load_plus_kv_graphs_warmup_s": ready_s, "device_name": backend.device_name,
        "backend": backend.name, "weight_bytes": int(backend.weight_bytes),
        "kv_bytes_per_token": block_bytes / args.block_size,
        "kv_bytes_per_1k_tokens": block_bytes * 1000 / args.block_size,
        "kv_blocks": num_blocks, "kv_bytes_allocated": num_blocks * block_bytes,
        "device_memory_bytes": dict(memory) if memory else None, "quant_types": quant_type_counts(model),
        "max_batch": max_batch, "max_tokens_per_step": max_tokens_per_step}


def run_sections(args: argparse.Namespace, results: ResultFile, model: Any, engine: Any) -> None:
    vocab = model.config.vocab_size
    context = model.config.context_length
    if "decode" not in args.skip_set:
        results.run_section("decode", args.budget_s, lambda budget: each_within_budget(
            budget, args.batch_list, lambda batch: measure_decode(
                engine, vocab, batch, args.prompt_len, args.warmup_steps, args.decode_steps,
                decode_max_tokens(args, batch)), engine))
    if "step_parts" not in args.skip_set:
        results.run_section("step_parts", args.budget_s, lambda _budget: cuda_step_parts(
            engine.backend, [b for b in STEP_PARTS_BATCHES if b in args.batch_list]))
    if "prefill" not in args.skip_set:
        fitting = [n for n in args.prefill_list if n < context]
        results.run_section("prefill", args.budget_s, lambda budget: {
            **each_within_budget(budget, fitting, lambda n: measure_prefill(
                engine, vocab, n, args.prefill_repeats), engine),
            **{str(n): {"skipped": f"longer than the context ({context})"}
               for n in args.prefill_list if n >= context}})
    if "aggregate" not in args.skip_set:
        results.run_section("aggregate", args.budget_s, lambda budget: measure_aggregate(
            engine, vocab, args.agg_seqs, args.agg_prompt, args.agg_new, budget))


def cuda_step_parts(backend: Any, batches: list[int]) -> dict[str, Any]:
    """cuda only, right after the decode runs (the step buffers hold valid inputs): median ms of
    the decode graph replay alone and of the GPU sampler alone per batch size, from the CUDA
    backend's own bench (tests/gpu/bench_cuda_backend.py). decode ms_per_step minus these = the
    host-side cost of an engine step."""
    if backend.name != "cuda" or getattr(backend, "graphs", None) is None:
        return {"skipped": "needs the cuda backend with decode graphs"}
    sys.path.insert(0, str(REPO / "tests" / "gpu"))
    from bench_cuda_backend import time_step_parts

    return {str(batch): time_step_parts(backend, batch) for batch in batches}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header = {"kind": "engine", "model": str(args.model), "label": args.label or args.model.stem,
              "model_file_bytes": args.model.stat().st_size, "quick": args.quick,
              "args": {k: v for k, v in vars(args).items() if k != "skip_set"}}
    results = ResultFile(args.json, header)
    load_holder: dict[str, Any] = {}

    def load(_budget: Any) -> dict[str, Any]:
        model, backend, engine, measures = load_engine(args)
        load_holder.update(model=model, backend=backend, engine=engine)
        return measures

    results.run_section("load", args.budget_s, load)
    if "engine" not in load_holder:
        return 1
    try:
        run_sections(args, results, load_holder["model"], load_holder["engine"])
    finally:
        load_holder["backend"].close()
    print(f"engine bench done{': ' + str(args.json) if args.json else ''}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
