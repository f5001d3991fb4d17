"""Launcher of cuda/swiglu.cu: out = silu(gate) * up (out may alias gate)."""
from __future__ import annotations

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, ptr

THREADS = 256


def launch_swiglu(device, gate: DeviceTensor, up: DeviceTensor, out: DeviceTensor) -> None:
    """gate, up, out: [num_tokens, width] f32."""
    check_tensor("gate", gate, (None, None), np.float32)
    check_tensor("up", up, gate.shape, np.float32)
    check_tensor("out", out, gate.shape, np.float32)
    count = gate.size
    launch(device.kernel("swiglu_f32"), (-(-count // THREADS),), (THREADS,), device.stream,
           ptr(gate), ptr(up), ptr(out), np.int64(count))
