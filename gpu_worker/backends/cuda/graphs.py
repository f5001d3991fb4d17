"""CUDA graphs for decode steps, one per batch-size bucket.

PyCUDA 2026.1 has no graph API, so stream capture and graph launch go through NVIDIA's
cuda-python (`cuda.bindings.driver`) on PyCUDA's own stream and context: PyCUDA stays the owner of
context, memory and modules. Kernel arguments are baked in at capture, so a captured step reads
all per-step data (ids, positions, slots, block tables) from the static buffers of Qwen2Forward.
"""
from __future__ import annotations

from collections.abc import Callable

from gpu_worker.backends.cuda.device import CudaBackendError

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _driver():
    try:
        from cuda.bindings import driver  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cuda as driver  # older cuda-python layout
        except ImportError:
            return None
    return driver


def graphs_available() -> bool:
    return _driver() is not None


def _check(result, what: str):
    """cuda-python returns (CUresult, *values); raise unless CUDA_SUCCESS."""
    err, *values = result if isinstance(result, tuple) else (result,)
    driver = _driver()
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CudaBackendError(f"{what} failed: {err}")
    return values[0] if len(values) == 1 else values


class DecodeGraphs:
    """Captured decode steps keyed by bucket size; `replay(n)` runs the smallest bucket >= n."""

    def __init__(self, stream, buckets: tuple[int, ...]) -> None:
        driver = _driver()
        if driver is None:
            raise CudaBackendError("cuda-python (cuda.bindings.driver) is not installed: no CUDA graphs")
        self._driver = driver
        self._stream = driver.CUstream(stream.handle)
        self.buckets = tuple(sorted(buckets))
        self._execs: dict[int, object] = {}
        self._graphs: dict[int, object] = {}

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n and b in self._execs), None)

    def capture(self, bucket: int, enqueue_step: Callable[[int], None]) -> None:
        """Records enqueue_step(bucket)'s launches (no copies, no syncs inside) as a graph."""
        d = self._driver
        _check(d.cuStreamBeginCapture(self._stream, d.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture")
        try:
            enqueue_step(bucket)
        finally:
            graph = _check(d.cuStreamEndCapture(self._stream), "cuStreamEndCapture")
        self._graphs[bucket] = graph
        self._execs[bucket] = _check(d.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")

    def replay(self, bucket: int) -> None:
        _check(self._driver.cuGraphLaunch(self._execs[bucket], self._stream), "cuGraphLaunch")

    def close(self) -> None:
        d = self._driver
        for exec_ in self._execs.values():
            d.cuGraphExecDestroy(exec_)
        for graph in self._graphs.values():
            d.cuGraphDestroy(graph)
        self._execs.clear()
        self._graphs.clear()
