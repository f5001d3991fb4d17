"""GPU time per kernel of one prefill, under Nsight Compute, grouped by kernel family: where a
prefill's time goes. A diagnostic, not a test. On the GPU machine:

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        --print-units base python tools/profile_prefill.py MODEL.gguf [tokens] > ncu.csv
    python tools/profile_prefill.py --summarize ncu.csv

The prefill runs twice (warm-up, then profiled between cuProfilerStart/Stop)."""
from __future__ import annotations

import csv
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def profile(model_path: str, tokens: int) -> None:
    import numpy as np
    from cuda.bindings import driver

    from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step
    from gpu_worker.backends.cuda.backend import CudaBackend
    from gpu_worker.model.gguf_loader import load_gguf

    block = 16
    backend = CudaBackend(load_gguf(Path(model_path)), max_num_tokens=max(2048, tokens), max_num_seqs=8,
                          max_model_len=max(2048, tokens), use_graphs=False)
    backend.allocate_kv_cache(backend.num_kv_blocks_for_budget(block, kv_cache_gb=1), block)
    prompt = tuple(np.random.default_rng(0).integers(0, backend.config.vocab_size, tokens).tolist())
    step = build_step([SequenceChunk(prompt, 0, blocks_for(0, tokens, block))], block)
    backend.logits(step)
    backend.device.synchronize()
    driver.cuProfilerStart()
    backend.logits(step)
    backend.device.synchronize()
    driver.cuProfilerStop()
    backend.close()


def summarize(csv_path: str) -> None:
    """Sum of gpu__time_duration per kernel family (the name without its type/tile suffix)."""
    lines = Path(csv_path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    totals, counts = defaultdict(float), defaultdict(int)
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = re.sub(r"\(.*", "", row["Kernel Name"]).strip()
        totals[name] += float(row["Metric Value"].replace(",", "")) / 1e3   # ns -> us
        counts[name] += 1
    total = sum(totals.values())
    print("| kernel | launches | us | share |\n|---|---|---|---|")
    for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {name} | {counts[name]} | {us:,.0f} | {us / total:.0%} |")
    print(f"| **all** | {sum(counts.values())} | {total:,.0f} | |")


if __name__ == "__main__":
    if sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        profile(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 512)
