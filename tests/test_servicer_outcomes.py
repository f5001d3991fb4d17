"""The servicer counts each Generate call's outcome once, however the stream ends (a fake worker
link: no worker process, no network)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gpu_worker.model.synthetic import write_synthetic_gguf
from qwen_serve.v1 import generate_pb2 as pb
from server.config import ServeConfig
from server.metrics import Metrics
from server.servicer import QwenServeServicer
from server.worker_client import FinishedEvent, TokenEvent
from server.worker_link import ServingModel, _load_model_facts


class FakeWorker:
    """Two batches of tokens, then the finish: what WorkerClient.generate_batches yields."""

    def __init__(self) -> None:
        self.aborted: list[str] = []

    async def generate_batches(self, request_id: str, prompt_ids: list[int], sampling: Any,
                               stopping: Any) -> AsyncIterator[list[Any]]:
        yield [TokenEvent(5)]
        await asyncio.sleep(0)
        yield [TokenEvent(6), FinishedEvent("length", len(prompt_ids), 2, 0, 1, 1)]

    async def abort(self, request_id: str) -> bool:
        self.aborted.append(request_id)
        return True


class FakeLink:
    def __init__(self, model: ServingModel) -> None:
        self.worker, self._model = FakeWorker(), model

    def model(self) -> ServingModel:
        return self._model


class FakeContext:
    def time_remaining(self) -> float | None:
        return None

    async def abort(self, code: Any, details: str, *rest: Any) -> None:
        raise AssertionError(f"unexpected abort {code}: {details}")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ServingModel:
    path = tmp_path_factory.mktemp("servicer") / "tiny.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return _load_model_facts({"model_path": str(path), "vocab_size": 269, "context_length": 4096})


def outcomes(metrics: Metrics) -> dict[str, float]:
    counts = {}
    for name in ("length", "cancelled", "deadline_exceeded", "eos", "stop"):
        value = metrics.registry.get_sample_value("qwen_serve:requests_total", {"outcome": name})
        if value:
            counts[name] = value
    return counts


@pytest.mark.parametrize("close_after", ["token", "finished", "never"])
def test_a_generate_call_is_counted_once(model: ServingModel, close_after: str) -> None:
    """Closed by grpc (client cancel) after a token message: counted cancelled. Closed after the
    Finished message was handed to grpc (a cancel while it is sent): counted by its finish reason
    only, not also as cancelled. Run to its end: counted once."""

    async def scenario() -> tuple[list[str], dict[str, float]]:
        metrics = Metrics()
        servicer = QwenServeServicer(FakeLink(model), metrics, ServeConfig())
        request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]),
                                     stopping=pb.StoppingParams(max_tokens=2))
        stream = servicer.Generate(request, FakeContext())
        kinds = []
        async for message in stream:
            kinds.append(message.WhichOneof("event"))
            if kinds[-1] == close_after:
                await stream.aclose()          # GeneratorExit at the yield, as grpc.aio does
                break
        return kinds, outcomes(metrics)

    kinds, counted = asyncio.run(scenario())
    if close_after == "token":
        assert kinds == ["started", "token"] and counted == {"cancelled": 1}
    else:
        assert kinds == ["started", "token", "token", "finished"] and counted == {"length": 1}
