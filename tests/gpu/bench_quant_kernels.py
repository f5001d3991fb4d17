"""Bandwidth of the fp32 quantized matvec (decode; `QWEN_SERVE_CUDA_LINEAR=fp32`) at the real
Qwen2.5-0.5B shapes (the tensor-core linear layers: bench_linear_mma.py). Run on the GPU machine: `python tests/gpu/bench_quant_kernels.py [out.json]`.

Kernel time = replay of a CUDA graph of many launches (cuda.bindings, when present) / launches,
so Python launch cost stays out; weights rotate over a 1 GiB pool so L2 (50 MB) cannot hold them.
"""
from __future__ import annotations

import itertools
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import test_quant_kernels as kit  # noqa: E402  (module loader shared with the tests)
from gguf import GGMLQuantizationType as QType  # noqa: E402

from gpu_worker.backends.cuda.ops.matvec import (  # noqa: E402
    MAX_SHARED_BYTES, MatvecFusion, MatvecOp, plan_matvec,
)
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight  # noqa: E402

POOL_BYTES = 1 << 30
ROWS_PER_CTA_VARIANTS = (None, 4)   # None: the launcher's default (marked * in the table)
# (name, rows, cols, type) of the default Q4_K_M file, plus its F16 conversion's big ones.
MATVEC_SHAPES = [
    ("attn_q/o", 896, 896, QType.Q5_0), ("attn_k", 128, 896, QType.Q5_0), ("attn_v", 128, 896, QType.Q8_0),
    ("ffn_gate/up", 4864, 896, QType.Q5_0), ("ffn_down", 896, 4864, QType.Q6_K),
    ("ffn_down", 896, 4864, QType.Q4_K), ("lm_head", 151936, 896, QType.Q8_0),
    ("ffn_gate/up", 4864, 896, QType.F16), ("ffn_down", 896, 4864, QType.F16),
    ("lm_head", 151936, 896, QType.F16),
]


class Timer:
    """Times `launch(i)` for i in range(count) as one captured graph (median of 5 replays)."""

    def __init__(self, drv, stream) -> None:
        self.drv, self.stream = drv, stream
        try:
            from cuda.bindings import driver as cu
            self.cu = cu
        except ImportError:
            self.cu = None

    def per_launch_us(self, launch, count: int) -> float:
        for i in range(3):
            launch(i)
        self.stream.synchronize()
        run = self._graph(launch, count) if self.cu else (lambda: [launch(i) for i in range(count)])
        times = []
        for _ in range(5):
            start, end = self.drv.Event(), self.drv.Event()
            start.record(self.stream)
            run()
            end.record(self.stream)
            end.synchronize()
            times.append(end.time_since(start) * 1e3 / count)
        return float(np.median(times))

    def _graph(self, launch, count: int):
        cu = self.cu
        cs = cu.CUstream(self.stream.handle)
        cu.cuStreamBeginCapture(cs, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        for i in range(count):
            launch(i)
        err, graph = cu.cuStreamEndCapture(cs)
        err2, exec_graph = cu.cuGraphInstantiate(graph, 0)
        if err != cu.CUresult.CUDA_SUCCESS or err2 != cu.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"graph capture failed: {err} {err2}")
        return lambda: cu.cuGraphLaunch(exec_graph, cs)


def copy_bandwidth_gbs(drv, pool: int, timer: Timer) -> float:
    half = POOL_BYTES // 2
    us = timer.per_launch_us(lambda i: drv.memcpy_dtod_async(pool + half, pool, half, timer.stream), 10)
    return 2 * half / (us * 1e-6) / 1e9


def bench_matvec(drv, module, stream, pool: int, timer: Timer) -> list[dict]:
    matvec, dev, rng = MatvecOp(module), kit.Device(drv), np.random.default_rng(0)
    results = []
    for name, rows, cols, qtype in MATVEC_SHAPES:
        nbytes = DeviceWeight(int(qtype), rows, cols, 1).nbytes
        stride = -(-nbytes // 256) * 256
        copies = max(2, min(64, POOL_BYTES // stride))
        weights = [DeviceWeight(int(qtype), rows, cols, pool + i * stride) for i in range(copies)]
        variants = list(itertools.product((1, 8), ROWS_PER_CTA_VARIANTS))
        if qtype != QType.F16 and rows >= 4864:
            variants += [(64, None), (256, None)]
        for batch, rows_per_cta in variants:
            if rows_per_cta and rows_per_cta * weights[0].row_bytes + 16 > MAX_SHARED_BYTES:
                continue
            x = dev.upload(rng.standard_normal((batch, cols), dtype=np.float32))
            y = dev.poisoned((batch, rows))
            plan = plan_matvec(weights[0], batch, rows_per_cta)
            us = timer.per_launch_us(
                lambda i: matvec(weights[i % copies], x, y, batch, stream, rows_per_cta), 4 * copies)
            moved = nbytes + 4 * batch * (rows + cols)
            results.append(dict(kernel="matvec", shape=name, rows=rows, cols=cols, type=qtype.name,
                                batch=batch, variant=f"r{plan.rows_per_cta}" + ("*" if rows_per_cta is None else ""),
                                us=us, weight_bytes=nbytes, gbs=moved / (us * 1e-6) / 1e9))
    return results


FUSED_SHAPES = [("gate+up swiglu", 9728, 896, QType.Q5_0, "swiglu"), ("o accumulate", 896, 896, QType.Q5_0, "accumulate"),
                ("down accumulate", 896, 4864, QType.Q6_K, "accumulate")]


def bench_fused(drv, module, stream, pool: int, timer: Timer) -> list[dict]:
    """Fused launches (RMSNorm prologue on the gate/up one) at batch 1, default tiling."""
    matvec, dev, rng = MatvecOp(module), kit.Device(drv), np.random.default_rng(2)
    results = []
    for name, rows, cols, qtype, epilogue in FUSED_SHAPES:
        weight = DeviceWeight(int(qtype), rows, cols, pool)
        copies = max(2, min(64, POOL_BYTES // (-(-weight.nbytes // 256) * 256)))
        stride = -(-weight.nbytes // 256) * 256
        weights = [DeviceWeight(int(qtype), rows, cols, pool + i * stride) for i in range(copies)]
        gain = dev.upload(np.ones(cols, np.float32)) if epilogue == "swiglu" else 0
        fusion = MatvecFusion(epilogue, norm_weight_ptr=gain)
        x = dev.upload(rng.standard_normal((1, cols), dtype=np.float32))
        y = dev.upload(np.zeros((1, rows), np.float32))
        us = timer.per_launch_us(lambda i: matvec(weights[i % copies], x, y, 1, stream, None, fusion), 4 * copies)
        results.append(dict(kernel="fused", shape=name, rows=rows, cols=cols, type=qtype.name, batch=1,
                            variant="*", us=us, weight_bytes=weight.nbytes,
                            gbs=weight.nbytes / (us * 1e-6) / 1e9))
    return results


def main() -> None:
    import pycuda.autoinit  # noqa: F401
    import pycuda.driver as drv

    module = kit.load_quant_module(drv, Path(tempfile.mkdtemp()))
    stream, card = drv.Stream(), drv.Context.get_device().name()
    pool_alloc = drv.mem_alloc(POOL_BYTES)
    pool = int(pool_alloc)
    chunk = np.random.default_rng(7).integers(0, 256, 64 << 20, dtype=np.uint8)
    for offset in range(0, POOL_BYTES, chunk.nbytes):   # random bytes, never zeros
        drv.memcpy_htod(pool + offset, chunk)
    timer = Timer(drv, stream)
    copy_gbs = copy_bandwidth_gbs(drv, pool, timer)
    rows = bench_matvec(drv, module, stream, pool, timer) + bench_fused(drv, module, stream, pool, timer)
    report = dict(card=card, graph_timing=timer.cu is not None, copy_gbs=copy_gbs, results=rows)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\ncard: {report['card']}  graph timing: {report['graph_timing']}  "
          f"dtod copy: {report['copy_gbs']:.0f} GB/s (read+write)")
    print(f"{'kernel':7} {'shape':12} {'rows x cols':>13} {'type':5} {'B/M':>4} {'tile':5} {'us':>9} {'GB/s':>7} "
          f"{'%copy':>6} {'TFLOP/s':>8}")
    for r in report["results"]:
        gbs = r.get("gbs")
        pct = f"{100 * gbs / report['copy_gbs']:.0f}" if gbs else ""
        print(f"{r['kernel']:7} {r['shape']:12} {r['rows']:>6}x{r['cols']:<6} {r['type']:5} {r['batch']:>4} {r['variant']:5} "
              f"{r['us']:9.2f} {gbs or 0:7.0f} {pct:>6} {r.get('tflops', 0):8.1f}")


if __name__ == "__main__":
    main()
