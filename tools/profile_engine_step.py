"""Where the host time of a decode step goes: `batch` sequences decoding on the CUDA backend
(real engine, real backend), 20 steps under cProfile, plus the same steps timed without it.

    python tools/profile_engine_step.py MODEL.gguf [--batch 256] [--prompt-len 128] [--top 30]

Prints ms per step, then the cProfile table (cumulative and own time per function)."""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_measures import add_requests, random_prompts
from gpu_worker.backends.factory import create_backend
from gpu_worker.engine.engine import TokenOut
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.worker_main import create_engine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    model = load_gguf(args.model)
    backend = create_backend("cuda", model, max_num_tokens=2048, max_num_seqs=args.batch)
    engine = create_engine(model, backend, -(-args.batch * (args.prompt_len + 200) // 16) + 8, 16, args.batch, 2048)
    add_requests(engine, random_prompts(args.batch, args.prompt_len, model.config.vocab_size, seed=1), max_tokens=150)
    while len(engine.scheduler.running) < args.batch or engine.scheduler.waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    started = time.perf_counter()
    tokens = sum(isinstance(e, TokenOut) for _ in range(20) for e in engine.step())
    plain_ms = 1e3 * (time.perf_counter() - started) / 20
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        engine.step()
    profiler.disable()
    print(f"batch {args.batch}: {plain_ms:.2f} ms per decode step without the profiler ({tokens} tokens in 20 steps)")
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    backend.close()


if __name__ == "__main__":
    main()
