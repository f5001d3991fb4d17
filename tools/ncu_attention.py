"""Launches of cuda/attention.cu at batch 1 (one query at the end of a `context`-position prompt,
GQA 14/2) and of a prompt chunk (blocks of one, then two row groups), for Nsight Compute on the GPU machine:
  ncu --clock-control none --section SpeedOfLight --section WarpStateStats --section SourceCounters \
      python tools/ncu_attention.py [context] [chunk] [repeats, 0 under ncu]
Random K/V and queries; prints the GPU time per launch (events over `repeats` launches) of each shape."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gpu_worker.backends.cuda.device import CudaDevice
from gpu_worker.backends.cuda.ops.attention import launch_attention

HEADS, KV_HEADS, DIM, BLOCK = 14, 2, 64, 16


def upload(device: CudaDevice, array: np.ndarray):
    tensor = device.memory.tensor("ncu", array.shape, array.dtype)
    device.cuda.memcpy_htod(tensor.ptr, np.ascontiguousarray(array))
    return tensor


def main() -> None:
    context = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    chunk = int(sys.argv[2]) if len(sys.argv) > 2 else 512
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 20
    device, rng = CudaDevice(0), np.random.default_rng(0)
    num_blocks = -(-max(context, chunk) // BLOCK)
    k = upload(device, rng.standard_normal((num_blocks * BLOCK, KV_HEADS, DIM)).astype(np.float16))
    v = upload(device, rng.standard_normal((num_blocks * BLOCK, KV_HEADS, DIM)).astype(np.float16))
    table = upload(device, rng.permutation(num_blocks).astype(np.int32)[None, :])
    prompt = np.arange(chunk, dtype=np.int32)
    for label, positions, groups in ((f"decode, context {context}", np.array([context - 1], np.int32), 1),
                                     (f"prompt of {chunk}, one row group per block", prompt, 1),
                                     (f"prompt of {chunk}, two row groups per block", prompt, 2)):
        n = len(positions)
        q = upload(device, rng.standard_normal((n, HEADS, DIM)).astype(np.float32))
        out = device.memory.tensor("ncu", (n, HEADS, DIM), np.dtype(np.float32))
        args = (q, out, k, v, table, upload(device, np.zeros(n, np.int32)), upload(device, positions), BLOCK)
        launch_attention(device, *args, row_groups=groups)
        if not repeats:
            continue
        start, end = device.cuda.Event(), device.cuda.Event()
        start.record(device.stream)
        for _ in range(repeats):
            launch_attention(device, *args, row_groups=groups)
        end.record(device.stream)
        end.synchronize()
        print(f"attention {label}: {1e3 * end.time_since(start) / repeats:.1f} us per launch (host launch included)")
    device.close()


if __name__ == "__main__":
    main()
