"""Time of cuda/linear_mma.cu per layout / token tile at the real Qwen2.5-0.5B shapes and decode /
prefill token counts (the launcher's pick marked *), with TFLOP/s and weight GB/s. A benchmark,
not a test. Run on the GPU machine: `python tests/gpu/bench_linear_mma.py [out.json]`;
LINEAR_MMA_SHARED_KB=48 plans with a smaller shared-memory budget (more CTAs per SM);
BENCH_SHAPES=attn_k/v,ffn_down runs only those shapes, BENCH_TOKENS=1,8 only those token counts."""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_quant_kernels as kit  # noqa: E402
from bench_quant_kernels import POOL_BYTES, Timer  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402

from gpu_worker.backends.cuda.ops.linear_mma import ALL_TILES, LinearMmaOp  # noqa: E402
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight  # noqa: E402

SHAPES = [("attn_q/o", 896, 896, QType.Q5_0), ("attn_k/v", 128, 896, QType.Q5_0),
          ("gate_up", 9728, 896, QType.Q5_0), ("ffn_down", 896, 4864, QType.Q6_K),
          ("lm_head", 151936, 896, QType.Q8_0)]
TOKENS = (1, 8, 64, 128, 256, 512)


def main() -> None:
    if "LINEAR_MMA_SHARED_KB" in os.environ:
        from gpu_worker.backends.cuda.ops import linear_mma
        linear_mma.SHARED_BUDGET = int(os.environ["LINEAR_MMA_SHARED_KB"]) * 1024
    drv = __import__("pycuda.driver", fromlist=["driver"])
    import pycuda.autoinit  # noqa: F401
    module = kit.load_quant_module(drv, Path(tempfile.mkdtemp()))
    stream = drv.Stream()
    timer = Timer(drv, stream)
    dev, rng = kit.Device(drv), np.random.default_rng(0)
    scratch_halves = max(TOKENS) * max(cols for _, _, cols, _ in SHAPES)
    # 9728 rows, the largest layer matrix (gate/up); the forward holds 16384 LM head rows (forward.py:
    # weight_scratch_halves), so there the LM head runs in 10 slices, not the 16 timed here
    weight_halves = 9728 * 896
    linear = LinearMmaOp(module, (dev.upload(np.zeros(scratch_halves, np.float16)), scratch_halves),
                         (dev.upload(np.zeros(weight_halves, np.float16)), weight_halves))
    pool_allocation = drv.mem_alloc(POOL_BYTES)   # kept referenced: freed when collected
    pool = int(pool_allocation)
    results = []
    print("| shape | tokens | layout/groups | us | TFLOP/s | weight GB/s |\n|---|---|---|---|---|---|")
    only = os.environ.get("BENCH_SHAPES")   # e.g. "attn_k/v,ffn_down": just those shapes
    for name, rows, cols, qtype in SHAPES:
        if only and name not in only.split(","):
            continue
        nbytes = DeviceWeight(int(qtype), rows, cols, 1).nbytes
        stride = -(-nbytes // 256) * 256
        copies = max(2, min(32, POOL_BYTES // stride))
        weights = [DeviceWeight(int(qtype), rows, cols, pool + i * stride) for i in range(copies)]
        for tokens in [int(t) for t in os.environ.get("BENCH_TOKENS", "").split(",") if t] or TOKENS:
            x = dev.upload(rng.standard_normal((tokens, cols), dtype=np.float32))
            y = dev.poisoned((tokens, rows))
            chosen = linear.choose(weights[0], tokens)
            for tile in ALL_TILES:
                too_wide = tile[1] > max(1, -(-tokens // 8)) and tile[0] != "narrow"   # narrow: always 16 tokens
                if too_wide or not linear.can_run(weights[0], tokens, tile):
                    continue
                us = timer.per_launch_us(lambda i, t=tile: linear(weights[i % copies], x, y, tokens, stream, tile=t),
                                         2 * copies)
                tflops = 2 * rows * cols * tokens / (us * 1e-6) / 1e12
                mark = "*" if tile == chosen else ""
                print(f"| {name} {qtype.name} | {tokens} | {tile[0]} g{tile[1]}{mark} | {us:.1f} | {tflops:.1f} | "
                      f"{nbytes / (us * 1e-6) / 1e9:,.0f} |")
                results.append(dict(shape=name, type=qtype.name, rows=rows, cols=cols, tokens=tokens,
                                    layout=tile[0], groups=tile[1], chosen=tile == chosen, us=us, tflops=tflops))
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
