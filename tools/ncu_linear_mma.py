"""One launch of each linear_mma layout at a real shape, for Nsight Compute on the GPU machine:
  ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section Occupancy \
      python tools/ncu_linear_mma.py [gate_up|down|q] [tokens] [layout:groups ...]
Random weights and inputs; prints nothing but what ncu reports."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "gpu"))
sys.path.insert(0, str(REPO))
import test_quant_kernels as kit  # noqa: E402
from gguf import GGMLQuantizationType as QType  # noqa: E402

from gpu_worker.backends.cuda.ops.linear_mma import LinearMmaOp  # noqa: E402

SHAPES = {"q": (896, 896, QType.Q5_0), "gate_up": (9728, 896, QType.Q5_0), "down": (896, 4864, QType.Q6_K),
          "lm_head": (151936, 896, QType.Q8_0)}


def main() -> None:
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as drv

    name = sys.argv[1] if len(sys.argv) > 1 else "gate_up"
    tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    rows, cols, qtype = SHAPES[name]
    module = kit.load_quant_module(drv, Path(tempfile.mkdtemp()))
    stream, dev, rng = drv.Stream(), kit.Device(drv), np.random.default_rng(0)
    weight, _ = kit.upload_weight(dev, qtype, rows, cols, rng)
    weight_halves = 9728 * 896   # the largest layer matrix (gate/up); the forward holds 16384 LM head rows
    linear = LinearMmaOp(module, (dev.upload(np.zeros(tokens * cols, np.float16)), tokens * cols),
                         (dev.upload(np.zeros(weight_halves, np.float16)), weight_halves))
    x = dev.upload(rng.standard_normal((tokens, cols), dtype=np.float32))
    y = dev.poisoned((tokens, rows))
    tiles = [(t.split(":")[0], int(t.split(":")[1])) for t in sys.argv[3:]] or \
        [("gemm", 8), ("gemm32", 8), ("rows", 4), ("split_k", 2)]
    for tile in tiles:
        linear(weight, x, y, tokens, stream, tile=tile)
    stream.synchronize()


if __name__ == "__main__":
    main()
