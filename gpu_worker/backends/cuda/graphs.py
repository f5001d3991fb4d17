"""CUDA graphs: decode steps, one per batch-size bucket (DecodeGraphs), and any captured launch
sequence (StreamGraph; Qwen2Forward.run keeps one per eager shape that repeats).

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


class StreamGraph:
    """One launch sequence captured from `stream` as a CUDA graph: `enqueue()` is called once under
    capture (its launches are recorded, not run; no copies or syncs inside), `replay()` runs
    them all with one cuGraphLaunch, without the per-launch gaps of stream launches."""

    def __init__(self, stream, enqueue: Callable[[], None]) -> None:
        driver = _driver()
        if driver is None:
            raise CudaBackendError("cuda-python (cuda.bindings.driver) is not installed: no CUDA graphs")
        self._driver = driver
        self._stream = driver.CUstream(stream.handle)
        _check(driver.cuStreamBeginCapture(self._stream,
                                           driver.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
               "cuStreamBeginCapture")
        try:
            enqueue()
        except BaseException:
            # End the capture (the stream must not stay capturing) and drop what it made; the
            # caller sees enqueue's own error, not the capture's.
            err, *partial = driver.cuStreamEndCapture(self._stream)
            if err == driver.CUresult.CUDA_SUCCESS and partial and partial[0] is not None:
                driver.cuGraphDestroy(partial[0])
            raise
        graph = _check(driver.cuStreamEndCapture(self._stream), "cuStreamEndCapture")
        self._graph = graph
        try:
            self._exec = _check(driver.cuGraphInstantiate(graph, 0), "cuGraphInstantiate")
        except CudaBackendError:
            driver.cuGraphDestroy(graph)
            raise

    def replay(self) -> None:
        _check(self._driver.cuGraphLaunch(self._exec, self._stream), "cuGraphLaunch")

    def close(self) -> None:
        if self._exec is not None:
            self._driver.cuGraphExecDestroy(self._exec)
            self._driver.cuGraphDestroy(self._graph)
            self._exec = self._graph = None


class DecodeGraphs:
    """Captured decode steps keyed by bucket size; `replay(n)` runs the smallest bucket >= n."""

    def __init__(self, stream, buckets: tuple[int, ...]) -> None:
        if _driver() is None:
            raise CudaBackendError("cuda-python (cuda.bindings.driver) is not installed: no CUDA graphs")
        self._stream = stream
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[int, StreamGraph] = {}

    def bucket_for(self, n: int) -> int | None:
        return next((b for b in self.buckets if b >= n and b in self._graphs), None)

    def capture(self, bucket: int, enqueue_step: Callable[[int], None]) -> None:
        """Records enqueue_step(bucket)'s launches (no copies, no syncs inside) as a graph."""
        self._graphs[bucket] = StreamGraph(self._stream, lambda: enqueue_step(bucket))

    def replay(self, bucket: int) -> None:
        self._graphs[bucket].replay()

    def close(self) -> None:
        for graph in self._graphs.values():
            graph.close()
        self._graphs.clear()
