"""Qwen2Forward.run's per-shape cache on the CPU (stand-ins for the module, the stream and the
graphs): a shape's first run is recorded, its second captures a graph from that recording, later
runs launch the graph; the least recent shape is dropped past RECORDED_SHAPES, its graph destroyed.
On the GPU, tests/gpu/test_cuda_backend.py checks that replayed shapes give the first run's bits."""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from types import SimpleNamespace
from typing import ClassVar

import pytest

from gpu_worker.backends.cuda import forward as forward_module
from gpu_worker.backends.cuda.forward import RECORDED_SHAPES, Qwen2Forward
from gpu_worker.backends.cuda.launcher import RecordedLaunches


class FakeGraph:
    """StreamGraph's stand-in: `enqueue` is what a capture would record (called once, here)."""

    made: ClassVar[list[FakeGraph]] = []

    def __init__(self, stream, enqueue) -> None:
        self.stream, self.launches, self.closed, self.replays = stream, enqueue, False, 0
        FakeGraph.made.append(self)

    def replay(self) -> None:
        assert not self.closed
        self.replays += 1

    def close(self) -> None:
        self.closed = True


class RecordingModule:
    def __init__(self) -> None:
        self.recordings = 0

    @contextlib.contextmanager
    def recording(self):
        self.recordings += 1
        yield RecordedLaunches()


def forward_with(graphs: bool, monkeypatch) -> tuple[Qwen2Forward, list[tuple]]:
    """A Qwen2Forward with only what run() touches; enqueue() logs its shapes instead of launching."""
    monkeypatch.setattr(forward_module, "StreamGraph", FakeGraph)
    FakeGraph.made = []
    forward = Qwen2Forward.__new__(Qwen2Forward)
    forward.device = SimpleNamespace(module=RecordingModule(), stream="stream")
    forward.linear_mma = SimpleNamespace(scratch_sizes=(1, 2))
    forward.use_graphs = graphs
    forward._recorded = OrderedDict()
    forward.replayed_runs = 0
    enqueued: list[tuple] = []
    forward.enqueue = lambda *shape: enqueued.append(shape)
    return forward, enqueued


def test_a_shape_is_recorded_then_captured_at_its_second_run_then_replayed(monkeypatch):
    forward, enqueued = forward_with(graphs=True, monkeypatch=monkeypatch)
    forward.run(512, 8, False)
    assert enqueued == [(512, 8, False, False)] and forward.device.module.recordings == 1
    assert FakeGraph.made == []            # a shape seen once gets no graph (one-off shapes are common)
    forward.run(512, 8, False)
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].replays == 1
    assert FakeGraph.made[0].stream == "stream"
    forward.run(512, 8, False)
    assert len(FakeGraph.made) == 1 and FakeGraph.made[0].replays == 2
    assert enqueued == [(512, 8, False, False)]   # the Python ran once
    assert forward.replayed_runs == 2
    forward.run(512, 8, False, decode=True)       # another shape: its own recording
    assert forward.device.module.recordings == 2


def test_without_graphs_the_recording_replays(monkeypatch):
    forward, enqueued = forward_with(graphs=False, monkeypatch=monkeypatch)
    for _ in range(3):
        forward.run(64, 8, False)
    assert FakeGraph.made == [] and len(enqueued) == 1 and forward.replayed_runs == 2


def test_the_least_recent_shape_is_dropped_and_its_graph_destroyed(monkeypatch):
    forward, _ = forward_with(graphs=True, monkeypatch=monkeypatch)
    forward.run(32, 8, False)
    forward.run(32, 8, False)              # now a graph
    first_graph = FakeGraph.made[0]
    for n in range(RECORDED_SHAPES):       # as many other shapes: the first is the least recent
        forward.run(64 + 32 * n, 8, False)
    assert first_graph.closed
    assert len(forward._recorded) == RECORDED_SHAPES


def test_drop_recordings_destroys_every_graph(monkeypatch):
    forward, _ = forward_with(graphs=True, monkeypatch=monkeypatch)
    for n in (32, 64):
        forward.run(n, 8, False)
        forward.run(n, 8, False)
    forward.run(96, 8, False)              # recorded only: nothing to destroy
    forward.drop_recordings()
    assert all(graph.closed for graph in FakeGraph.made) and len(FakeGraph.made) == 2
    assert not forward._recorded


@pytest.mark.parametrize("graphs", [False, True])
def test_a_module_that_does_not_record_runs_the_python_each_time(graphs, monkeypatch):
    forward, enqueued = forward_with(graphs=graphs, monkeypatch=monkeypatch)
    forward.device = SimpleNamespace(module=object(), stream="stream")   # PyCUDA launches
    forward.run(32, 8, False)
    forward.run(32, 8, False)
    assert len(enqueued) == 2 and FakeGraph.made == []
