"""Launcher of cuda/rms_norm.cu: fused residual add + RMSNorm."""
from __future__ import annotations

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, ptr

THREADS = 128


def launch_rms_norm(device, residual: DeviceTensor, weight: DeviceTensor, out: DeviceTensor, eps: float,
                    delta: DeviceTensor | None = None, row_ids: DeviceTensor | None = None,
                    write_residual: bool = False, out16: DeviceTensor | None = None) -> None:
    """out[r] = rmsnorm(residual[row] + delta[row]) * weight, row = row_ids[r] (or r).

    residual, delta: [num_rows, hidden] f32; weight: [hidden] f32; out: [num_out, hidden] f32;
    row_ids: [num_out] int32. With write_residual, residual[row] becomes residual + delta.
    out16: [num_out, hidden] f16 that also receives out, rounded to fp16 in the f16gemm layout's
    slot order (the next linear layer's operand, without a conversion pass).
    """
    num_rows, hidden = residual.shape
    check_tensor("residual", residual, (None, None), np.float32)
    check_tensor("weight", weight, (hidden,), np.float32)
    check_tensor("out", out, (None, hidden), np.float32)
    if delta is not None:
        check_tensor("delta", delta, (num_rows, hidden), np.float32)
    num_out = out.shape[0]
    if row_ids is None:
        if num_out != num_rows:
            raise ValueError(f"without row_ids out needs {num_rows} rows, got {num_out}")
    else:
        check_tensor("row_ids", row_ids, (num_out,), np.int32)
    if write_residual and row_ids is not None:
        raise ValueError("write_residual needs the identity row map")
    if out16 is not None:
        check_tensor("out16", out16, (num_out, hidden), np.float16)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    launch(device.kernel("rms_norm_f32"), (num_out,), (THREADS,), device.stream,
           ptr(delta), ptr(residual), ptr(weight), ptr(out), ptr(out16), ptr(row_ids),
           np.int32(hidden), np.float32(eps), np.int32(1 if write_residual else 0))
