"""gpu_worker/backends/cuda/graphs.py on the CPU, through a stand-in for cuda.bindings.driver that
logs its calls: a capture begins and ends around the launches, a failing launch sequence ends the
capture and frees what it made (its own error reaches the caller), a graph is destroyed once.
On the GPU, tests/gpu/test_cuda_backend.py runs the real graphs against eager launches."""
from __future__ import annotations

import enum
from types import SimpleNamespace

import pytest

from gpu_worker.backends.cuda import graphs
from gpu_worker.backends.cuda.device import CudaBackendError


class CUresult(enum.Enum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1


class FakeDriver:
    """The driver calls graphs.py makes, each returning cuda-python's (CUresult, *values)."""

    CUresult = CUresult
    CUstreamCaptureMode = SimpleNamespace(CU_STREAM_CAPTURE_MODE_THREAD_LOCAL="thread-local")

    def __init__(self, instantiate_fails: bool = False) -> None:
        self.calls: list[tuple] = []
        self.capturing = False
        self.instantiate_fails = instantiate_fails

    def CUstream(self, handle):
        return ("stream", handle)

    def cuStreamBeginCapture(self, stream, mode):
        assert not self.capturing, "captures do not nest"
        self.capturing = True
        self.calls.append(("begin", stream, mode))
        return (CUresult.CUDA_SUCCESS,)

    def cuStreamEndCapture(self, stream):
        assert self.capturing
        self.capturing = False
        self.calls.append(("end", stream))
        return (CUresult.CUDA_SUCCESS, "graph")

    def cuGraphInstantiate(self, graph, flags):
        self.calls.append(("instantiate", graph))
        if self.instantiate_fails:
            return (CUresult.CUDA_ERROR_INVALID_VALUE, None)
        return (CUresult.CUDA_SUCCESS, "exec")

    def cuGraphLaunch(self, exec_, stream):
        self.calls.append(("launch", exec_, stream))
        return (CUresult.CUDA_SUCCESS,)

    def cuGraphExecDestroy(self, exec_):
        self.calls.append(("destroy exec", exec_))
        return (CUresult.CUDA_SUCCESS,)

    def cuGraphDestroy(self, graph):
        self.calls.append(("destroy graph", graph))
        return (CUresult.CUDA_SUCCESS,)


@pytest.fixture
def driver(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(graphs, "_driver", lambda: fake)
    return fake


STREAM = SimpleNamespace(handle=7)


def test_a_stream_graph_captures_once_launches_each_replay_and_is_destroyed_once(driver):
    launched = []
    graph = graphs.StreamGraph(STREAM, lambda: launched.append("launches"))
    assert launched == ["launches"] and not driver.capturing
    assert [c[0] for c in driver.calls] == ["begin", "end", "instantiate"]
    assert driver.calls[0][1] == ("stream", 7)
    graph.replay()
    graph.replay()
    assert [c for c in driver.calls if c[0] == "launch"] == [("launch", "exec", ("stream", 7))] * 2
    graph.close()
    graph.close()
    assert [c for c in driver.calls if c[0].startswith("destroy")] == [("destroy exec", "exec"),
                                                                        ("destroy graph", "graph")]


def test_a_failing_launch_sequence_ends_the_capture_and_raises_its_own_error(driver):
    def enqueue():
        raise ValueError("step of 9999 tokens exceeds the buffers")

    with pytest.raises(ValueError, match="9999 tokens"):
        graphs.StreamGraph(STREAM, enqueue)
    assert not driver.capturing          # the stream can capture (and run) again
    assert [c[0] for c in driver.calls] == ["begin", "end", "destroy graph"]
    graphs.StreamGraph(STREAM, lambda: None)


def test_a_graph_that_does_not_instantiate_is_freed_and_reported(monkeypatch):
    fake = FakeDriver(instantiate_fails=True)
    monkeypatch.setattr(graphs, "_driver", lambda: fake)
    with pytest.raises(CudaBackendError, match="cuGraphInstantiate"):
        graphs.StreamGraph(STREAM, lambda: None)
    assert fake.calls[-1] == ("destroy graph", "graph")


def test_decode_graphs_serve_the_smallest_captured_bucket(driver):
    decode = graphs.DecodeGraphs(STREAM, (8, 1, 4))
    captured = []
    for bucket in (1, 4):
        decode.capture(bucket, captured.append)
    assert captured == [1, 4]
    assert [decode.bucket_for(n) for n in (1, 2, 4, 5)] == [1, 4, 4, None]   # 8 was never captured
    decode.replay(4)
    decode.close()
    assert decode.bucket_for(1) is None
    assert sum(1 for c in driver.calls if c[0] == "destroy exec") == 2


def test_no_cuda_python_no_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "_driver", lambda: None)
    assert not graphs.graphs_available()
    with pytest.raises(CudaBackendError, match="cuda-python"):
        graphs.StreamGraph(STREAM, lambda: None)
