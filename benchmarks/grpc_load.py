"""End-to-end load generator: N concurrent gRPC streaming clients against a qwen-serve server.

    python -m benchmarks.grpc_load --target 127.0.0.1:50051 --json out.json
    python -m benchmarks.grpc_load --serve-model MODEL.gguf --backend cuda --json out.json

Per concurrency level N (default 1,16,64,256): every client sends `--rounds` greedy requests of a
`--prompt-len`-token prompt (random ids, pre-tokenized) for exactly `--max-tokens` tokens (EOS
ignored). Reports client-observed time to first token and inter-token latency (p50/p99), the
aggregate output tok/s (all tokens / first send to last end), the single-stream decode rate
and errors. With --waves W each level runs W times (new prompts each time, so the prefix cache
serves none of them) and reports the wave of median aggregate, with every wave's aggregate beside
it: one burst of 256 streams is a ~1 s sample. With --serve-model it starts the server itself on a
free loopback port and stops it.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import ResultFile, parse_int_list, percentiles_ms
from benchmarks.engine_measures import random_prompts
from benchmarks.grpc_clients import ClientPlan, run_clients


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="grpc_load", description=__doc__.splitlines()[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", help="host:port of a running server")
    where.add_argument("--serve-model", type=Path,
                       help="start `qwen-serve serve` on this GGUF and stop it after")
    p.add_argument("--backend", choices=("cuda", "cpu", "auto"), default="cuda", help="with --serve-model")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="with --serve-model (default: 4 on cuda)")
    p.add_argument("--concurrency", default="1,16,64,256", help="levels N")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="sequential requests per client")
    p.add_argument("--waves", type=int, default=1,
                   help="times each level runs (fresh prompts each); the median wave is reported")
    p.add_argument("--client-procs", type=int, default=0, help="client processes (0: min(N, cores/2, 8))")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="time budget per level (s), split evenly over its waves (each stream's deadline)")
    p.add_argument("--json", type=Path)
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the harness, measures nothing")
    if p.parse_known_args(argv)[0].quick:   # quick sizes replace the defaults; explicit flags still win
        p.set_defaults(concurrency="1,3", prompt_len=8, max_tokens=4)
    args = p.parse_args(argv)
    args.levels = parse_int_list(args.concurrency)
    for name in ("prompt_len", "max_tokens", "rounds", "waves"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be > 0")
    if args.client_procs < 0:
        p.error("--client-procs must be >= 0")
    return args


def summarize(records: list[dict[str, Any]], expected_tokens: int) -> dict[str, Any]:
    """Client-side measures of one level from its stream records."""
    ok = [r for r in records if not r["error"] and r["finish_reason"] == "FINISH_REASON_LENGTH"
          and sum(r["token_counts"]) == expected_tokens]
    errors: dict[str, int] = {}
    for r in records:
        if r not in ok:
            finish = r["finish_reason"] or "missing"
            why = r["error"] or f"finish {finish} after {sum(r['token_counts'])} tokens"
            errors[why[:200]] = errors.get(why[:200], 0) + 1
    ttft = [r["token_times"][0] - r["sent"] for r in records if r["token_times"]]
    gaps: list[float] = []
    for r in records:   # a delta of n tokens after a gap g counts as n gaps of g / n
        for i in range(1, len(r["token_times"])):
            count = r["token_counts"][i]
            gaps += [(r["token_times"][i] - r["token_times"][i - 1]) / count] * count
    num_tokens = sum(sum(r["token_counts"]) for r in records)
    num_deltas = sum(len(r["token_counts"]) for r in records)
    wall = max(r["ended"] for r in records) - min(r["sent"] for r in records)
    # tokens after the first one / time from the first to the last delta (TTFT excluded)
    stream_rates = sorted((sum(r["token_counts"]) - r["token_counts"][0])
                          / (r["token_times"][-1] - r["token_times"][0])
                          for r in ok
                          if len(r["token_times"]) > 1 and r["token_times"][-1] > r["token_times"][0])
    return {"requests": len(records), "ok": len(ok), "errors": sum(errors.values()), "error_kinds": errors,
            "output_tokens": num_tokens, "wall_s": wall,
            # > 1 when the server sent tokens that were ready together in one message
            "tokens_per_delta": num_tokens / num_deltas if num_deltas else None,
            "aggregate_tok_s": num_tokens / wall if wall > 0 else None,
            "ttft": percentiles_ms(ttft), "itl": percentiles_ms(gaps),
            "stream_decode_tok_s_median": stream_rates[len(stream_rates) // 2] if stream_rates else None}


def median_wave(waves: list[dict[str, Any]]) -> dict[str, Any]:
    """The wave of median aggregate (the lower middle one of an even count), with every wave's
    aggregate in wave order."""
    rates = [wave["aggregate_tok_s"] or 0.0 for wave in waves]
    middle = sorted(range(len(waves)), key=lambda i: rates[i])[(len(waves) - 1) // 2]
    return waves[middle] | {"waves": len(waves), "median_wave": middle, "wave_aggregate_tok_s": rates}


def client_plans(args: argparse.Namespace, target: str, num_clients: int, vocab_size: int,
                 timeout_s: float, wave: int = 0) -> list[ClientPlan]:
    procs = args.client_procs or max(1, min(num_clients, (os.cpu_count() or 2) // 2, 8))
    procs = min(procs, num_clients)
    prompts = random_prompts(num_clients, args.prompt_len, vocab_size, seed=30_000 + num_clients + 1000 * wave)
    return [ClientPlan(target, tuple(prompts[i::procs]), args.rounds, args.max_tokens, timeout_s)
            for i in range(procs)]


def model_info(target: str) -> dict[str, Any]:
    import grpc

    from qwen_serve.v1 import generate_pb2 as pb
    from qwen_serve.v1 import generate_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        info = generate_pb2_grpc.QwenServeStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
    return {"model": info.model, "backend": info.backend, "device_name": info.device_name,
            "vocab_size": info.vocab_size, "weight_bytes": info.weight_bytes,
            "kv_cache_bytes": info.kv_cache_bytes}


def run_levels(args: argparse.Namespace, target: str, results: ResultFile) -> None:
    info = results.run_section("model_info", args.budget_s, lambda _budget: model_info(target))
    vocab = info.get("vocab_size") or 1000
    warmup_tokens = min(args.max_tokens, 16)   # one short request: first-use costs out of level 1
    results.run_section("warmup", args.budget_s, lambda budget: summarize(run_clients(
        [ClientPlan(target, tuple(random_prompts(1, args.prompt_len, vocab, seed=1)), 1, warmup_tokens,
                    budget.seconds)]), warmup_tokens))
    for level in args.levels:
        results.run_section(f"concurrency_{level}", args.budget_s, lambda budget, n=level: median_wave([
            summarize(run_clients(client_plans(args, target, n, vocab, budget.seconds / args.waves, wave)),
                      args.max_tokens) | {"concurrency": n, "rounds": args.rounds}
            for wave in range(args.waves)]))


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """`timeout` sends SIGTERM: stop the server this run started (it lives in its own session and
    would otherwise keep the GPU busy for the next benchmark) and the client processes, then exit.

    Done here rather than by raising SystemExit: an exception raised from a signal handler can land
    inside a finalizer or a C callback, where Python only prints it and carries on (a likely cause of
    one full local test run where this process exited 0 after SIGTERM; not reproduced since). The JSON
    already says which section never finished."""
    from benchmarks.grpc_clients import LIVE_PROCESSES
    from benchmarks.server_process import RUNNING

    for process in list(LIVE_PROCESSES):
        if process.is_alive():
            process.kill()
    for served in list(RUNNING):
        served.stop()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run(args: argparse.Namespace) -> int:
    header = {"kind": "grpc_load", "target": args.target, "serve_model": str(args.serve_model or ""),
              "backend": args.backend if args.serve_model else "", "quick": args.quick,
              "args": {k: v for k, v in vars(args).items()}}
    results = ResultFile(args.json, header)
    if args.target:
        run_levels(args, args.target, results)
        return 0
    from benchmarks.server_process import ServedModel

    kv_gb = args.kv_cache_gb if args.kv_cache_gb is not None else (4.0 if args.backend == "cuda" else None)
    max_n = max(args.levels)
    started = time.monotonic()
    try:
        served = ServedModel(args.serve_model, args.backend, max_batch=max_n, max_queue=max(64, 2 * max_n),
                             kv_cache_gb=kv_gb)
        with served:
            results.data["server_start_s"] = served.start_s
            results.data["server_pid"] = served.process.pid if served.process else None
            run_levels(args, served.target, results)
    except Exception as exc:  # noqa: BLE001 -- recorded in the JSON, then a non-zero exit
        results.data["server_error"] = f"{type(exc).__name__}: {exc}"[:4000]
        results.save()
        print(f"server failed after {time.monotonic() - started:.1f} s: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
