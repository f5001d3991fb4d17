"""Tokens that reach the front-end together leave together: WorkerClient.generate_batches hands the
consumer everything that arrived since it last asked, and Generation turns each batch into one delta
(one gRPC message) with the same text, ids, logprobs, stop-string cut and counts as one at a time."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gpu_worker.backends.base import TokenLogprobs
from gpu_worker.model.synthetic import write_synthetic_gguf
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.text.tokenizer import Tokenizer
from server.generation import Generation, GenerationJob
from server.metrics import Metrics
from server.requests import DeltaEvent, FinishedEvent, FinishReason, StartedEvent
from server.text import TextTools
from server.worker_client import FinishedEvent as WorkerFinished
from server.worker_client import TokenEvent, WorkerClient


@pytest.fixture(scope="module")
def tools(tiny_model_path: Path) -> TextTools:
    tokenizer = Tokenizer.from_gguf(str(tiny_model_path))
    return TextTools(tokenizer, tokenizer.chat_template, tokenizer.stop_token_ids)


class ScriptedWorker:
    """Hands Generation fixed batches; records whether the stream was closed early (= aborted)."""

    def __init__(self, batches: list[list[TokenEvent | WorkerFinished]]) -> None:
        self.batches = batches
        self.closed_early = False

    async def generate_batches(self, *_args: object) -> AsyncIterator[list[TokenEvent | WorkerFinished]]:
        finished = False
        try:
            for batch in self.batches:
                yield batch
            finished = True
        finally:
            self.closed_early = not finished


def job(stops: tuple[str, ...] = ()) -> GenerationJob:
    return GenerationJob("r", "r#1", "m", [1, 2, 3], SamplingParams(seed=1), StoppingParams(max_tokens=99),
                         stops, arrival_ns=0)


def run(tools: TextTools, worker: ScriptedWorker, stops: tuple[str, ...] = ()) -> tuple[list, Metrics]:
    metrics = Metrics()

    async def main() -> list:
        return [event async for event in Generation(worker, tools, metrics, job(stops)).events()]
    return asyncio.run(main()), metrics


def itl_count(metrics: Metrics) -> float:
    line = next(line for line in metrics.render().decode().splitlines()
                if line.startswith("qwen_serve:inter_token_latency_seconds_count"))
    return float(line.split()[1])


def test_a_batch_of_tokens_becomes_one_delta_with_all_ids_text_and_logprobs(tools: TextTools) -> None:
    ids = tools.tokenizer.encode("The autumn leaves fall")
    logprobs = [TokenLogprobs(i, -0.25, ((i, -0.25),)) for i in ids]
    tokens = [TokenEvent(i, lp) for i, lp in zip(ids, logprobs)]
    finish = WorkerFinished("length", 3, len(ids), 0, 0, 0)
    events, metrics = run(tools, ScriptedWorker([tokens[:1], tokens[1:], [finish]]))
    assert isinstance(events[0], StartedEvent)
    deltas = [e for e in events if isinstance(e, DeltaEvent)]
    assert [d.token_ids for d in deltas] == [tuple(ids[:1]), tuple(ids[1:])]
    assert "".join(d.text for d in deltas) == "The autumn leaves fall"
    assert [lp.token_id for d in deltas for lp in d.logprobs] == ids
    assert all(lp.top[0][2] == tools.piece(lp.token_id) for d in deltas for lp in d.logprobs)
    done = events[-1]
    assert isinstance(done, FinishedEvent) and done.reason is FinishReason.LENGTH
    assert done.completion_tokens == len(ids) and itl_count(metrics) == len(ids) - 1


def test_tokens_and_finish_in_one_batch(tools: TextTools) -> None:
    ids = tools.tokenizer.encode("Hi there")
    batch = [TokenEvent(i) for i in ids] + [WorkerFinished("eos", 3, len(ids), 0, 0, 0)]
    events, _ = run(tools, ScriptedWorker([batch]))
    assert [type(e) for e in events] == [StartedEvent, DeltaEvent, FinishedEvent]
    assert events[1].text == "Hi there" and events[1].token_ids == tuple(ids)
    assert events[-1].reason is FinishReason.EOS and events[-1].completion_tokens == len(ids)


def test_a_stop_string_inside_a_batch_cuts_the_delta_and_drops_later_tokens(tools: TextTools) -> None:
    ids = tools.tokenizer.encode("The autumn leaves fall down slowly")
    worker = ScriptedWorker([[TokenEvent(i) for i in ids], [WorkerFinished("length", 3, len(ids), 0, 0, 0)]])
    events, _ = run(tools, worker, stops=("ves fa",))
    one_at_a_time = ScriptedWorker([[TokenEvent(i)] for i in ids])
    reference, _ = run(tools, one_at_a_time, stops=("ves fa",))
    deltas, reference_deltas = ([e for e in evs if isinstance(e, DeltaEvent)] for evs in (events, reference))
    assert len(deltas) == 1 and deltas[0].text == "The autumn lea"
    assert deltas[0].token_ids == tuple(i for d in reference_deltas for i in d.token_ids)
    assert len(deltas[0].token_ids) < len(ids)
    same = ("reason", "matched_stop", "completion_tokens", "prompt_tokens")
    assert [getattr(events[-1], f) for f in same] == [getattr(reference[-1], f) for f in same]
    assert events[-1].reason is FinishReason.STOP and events[-1].matched_stop == "ves fa"
    assert events[-1].completion_tokens == len(deltas[0].token_ids)
    assert worker.closed_early and one_at_a_time.closed_early     # the worker request is aborted


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("batches") / "tiny-small-vocab.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=None)
    return path


def test_tokens_that_arrive_while_the_consumer_is_away_come_in_one_batch(small_vocab_model: Path) -> None:
    """Read one batch, then wait (without reading) until the worker reports the request done: the
    rest, FinishedEvent included, is one batch, and everything equals generate()'s events."""
    sampling, stopping = SamplingParams(temperature=0.0), StoppingParams(max_tokens=12, ignore_eos=True)

    async def main() -> tuple[list[list], list]:
        client = WorkerClient(str(small_vocab_model), "cpu", num_kv_blocks=64)
        await client.start()
        try:
            batches = client.generate_batches("b", [5, 6, 7], sampling, stopping)
            received = [await anext(batches)]
            while (stats := await client.stats())["running"] or stats["waiting"]:
                await asyncio.sleep(0.01)
            received += [batch async for batch in batches]
            one_by_one = [event async for event in client.generate("e", [5, 6, 7], sampling, stopping)]
            return received, one_by_one
        finally:
            await client.close()

    received, one_by_one = asyncio.run(main())
    assert len(received) == 2 and len(received[1]) > 2
    assert isinstance(received[1][-1], WorkerFinished)
    flat = [event for batch in received for event in batch]
    assert [e.token_id for e in flat[:-1]] == [e.token_id for e in one_by_one[:-1]]
    assert len(flat) == 13 and flat[-1].completion_tokens == 12 == one_by_one[-1].completion_tokens
