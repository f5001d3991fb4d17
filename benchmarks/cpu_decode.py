"""Greedy decode speed of the cpu backend on the real model (a benchmark, not a test).

    .venv/bin/python benchmarks/cpu_decode.py [--out benchmarks/results/cpu_decode.md]

Measures: weight load (dequantize to float32), prefill of the chat-templated haiku prompt, and
decode tokens/s at batch 1 (EOS ignored) plus aggregate tokens/s at larger decode batches. The
load average is recorded because other processes on a 2-core machine distort the numbers.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gpu_worker.backends.cpu import CpuBackend
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step
from gpu_worker.model.fetch import default_model_path
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.qwen2_reference import ROW_TILE

# "Write a haiku about autumn leaves" through the model's chat template (36 tokens)
HAIKU_PROMPT = (151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264,
                10950, 17847, 13, 151645, 198, 151644, 872, 198, 7985, 264, 6386, 38242, 911, 41674, 10901,
                151645, 198, 151644, 77091, 198)
BLOCK_SIZE = 16


def timed_decode(backend: CpuBackend, batch_size: int, num_steps: int) -> tuple[float, float, float]:
    """Prefill `batch_size` copies of the prompt (one step each), then `num_steps` batched greedy
    decode steps. Returns (seconds of the first prefill, wall and CPU seconds per decode step);
    CPU seconds (all threads) are what the step costs however busy the machine is."""
    from gpu_worker.backends.base import SampleRequest
    from gpu_worker.backends.cpu.sequence_runner import GREEDY

    total = len(HAIKU_PROMPT) + num_steps + 1
    tables = [blocks_for(s * -(-total // BLOCK_SIZE), total, BLOCK_SIZE) for s in range(batch_size)]
    backend.allocate_kv_cache(num_blocks=batch_size * len(tables[0]), block_size=BLOCK_SIZE)
    empty = np.zeros(0, np.int32)
    greedy = SampleRequest(GREEDY, 0, np.asarray(HAIKU_PROMPT, np.int32), empty)
    last = []
    prefill_s = 0.0
    for s in range(batch_size):
        started = time.perf_counter()
        out = backend.step(build_step([SequenceChunk(HAIKU_PROMPT, 0, tables[s], greedy)], BLOCK_SIZE))
        prefill_s = prefill_s or time.perf_counter() - started
        last.append(int(out.token_ids[0]))
    started, cpu_started = time.perf_counter(), time.process_time()
    for step in range(num_steps):
        position = len(HAIKU_PROMPT) + step
        chunks = [SequenceChunk((last[s],), position, tables[s], greedy) for s in range(batch_size)]
        last = [int(t) for t in backend.step(build_step(chunks, BLOCK_SIZE)).token_ids]
    return (prefill_s, (time.perf_counter() - started) / num_steps,
            (time.process_time() - cpu_started) / num_steps)


def describe_machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    return (f"{cpu}, {os.cpu_count()} cores visible, numpy {np.__version__}, "
            f"BLAS {blas.get('name')} {blas.get('version')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-sizes", default="1,4,16")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    backend = CpuBackend(load_gguf(args.model))
    load_s = time.perf_counter() - started
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(",")):
        prefill_s, step_s, cpu_s = timed_decode(backend, batch_size, args.steps)
        rows.append(f"| {batch_size} | {prefill_s:.2f} | {step_s * 1e3:.0f} | {cpu_s * 1e3:.0f} | "
                    f"{1 / step_s:.2f} | {batch_size / step_s:.2f} |")
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    report = "\n".join([
        f"# cpu backend decode speed ({args.model.name})", "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit.strip()}",
        f"- machine: {describe_machine()}",
        f"- load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        "(other processes share these cores)",
        f"- weights: {backend.weight_bytes / 1e9:.2f} GB float32, loaded in {load_s:.1f} s; "
        f"ROW_TILE {ROW_TILE}; {args.steps} greedy decode steps after a {len(HAIKU_PROMPT)}-token prefill",
        "", "| decode batch | prefill of 36 tokens (s) | wall ms per decode step | CPU ms per decode step "
        "(all threads) | tokens/s per sequence | tokens/s aggregate |",
        "|---|---|---|---|---|---|", *rows, ""])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)


if __name__ == "__main__":
    main()
