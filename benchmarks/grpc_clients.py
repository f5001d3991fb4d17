"""Client side of the gRPC load generator: processes of asyncio streaming clients.

One Python process cannot read tens of thousands of stream messages per second, so N clients are
spread over several processes (spawned: no gRPC state crosses a fork). They connect, meet at a
barrier, then each client sends its requests one after another. Timestamps are time.monotonic()
(CLOCK_MONOTONIC: one clock for every process on the machine).
"""
from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StreamRecord:
    """One Generate stream as the client saw it."""

    sent: float                                               # monotonic s
    ended: float = 0.0
    token_times: list[float] = field(default_factory=list)    # arrival of each token delta
    token_counts: list[int] = field(default_factory=list)     # token ids in that delta
    finish_reason: str = ""
    completion_tokens: int = 0
    error: str = ""


@dataclass(frozen=True)
class ClientPlan:
    target: str
    prompts: tuple[tuple[int, ...], ...]    # one per client of this process
    rounds: int                             # sequential requests per client
    max_tokens: int
    timeout_s: float


# Client processes of the level now running (grpc_load's SIGTERM handler kills them).
LIVE_PROCESSES: list[Any] = []


def run_clients(plans: list[ClientPlan]) -> list[dict[str, Any]]:
    """Run every plan in its own spawned process, started together; all records, as dicts."""
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(plans)), ctx.Queue()
    processes = [ctx.Process(target=_process_main, args=(plan, barrier, queue), daemon=True)
                 for plan in plans]
    records: list[dict[str, Any]] = []
    deadline = time.monotonic() + max(plan.timeout_s for plan in plans) + 60
    completed = False
    LIVE_PROCESSES[:] = processes
    try:
        for process in processes:
            process.start()
        for _ in processes:
            records += queue.get(timeout=max(1.0, deadline - time.monotonic()))
        completed = True
    finally:   # a client process that is stuck or left over must not run into the next level
        for process in processes:
            process.join(timeout=10 if completed else 0.1)
            if process.is_alive():
                process.kill()
        LIVE_PROCESSES.clear()
    return records


def _process_main(plan: ClientPlan, barrier: Any, queue: Any) -> None:
    try:
        records = asyncio.run(_run_plan(plan, barrier))
    except Exception as exc:  # noqa: BLE001 -- reported as failed streams, not a hung parent
        barrier.abort()
        failed = StreamRecord(sent=time.monotonic(), ended=time.monotonic(),
                              error=f"client process: {type(exc).__name__}: {exc}")
        records = [asdict(failed)] * (len(plan.prompts) * plan.rounds)
    queue.put(records)


async def _run_plan(plan: ClientPlan, barrier: Any) -> list[dict[str, Any]]:
    import grpc

    from qwen_serve.v1 import generate_pb2_grpc

    async with grpc.aio.insecure_channel(plan.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        stub = generate_pb2_grpc.QwenServeStub(channel)
        await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 60)
        per_client = await asyncio.gather(*(_client(stub, prompt, plan) for prompt in plan.prompts))
    return [asdict(record) for records in per_client for record in records]


async def _client(stub: Any, prompt: tuple[int, ...], plan: ClientPlan) -> list[StreamRecord]:
    return [await one_stream(stub, prompt, plan.max_tokens, plan.timeout_s) for _ in range(plan.rounds)]


async def one_stream(stub: Any, prompt: tuple[int, ...], max_tokens: int, timeout_s: float) -> StreamRecord:
    """Greedy, EOS ignored, so every request asks for exactly max_tokens tokens."""
    import grpc

    from qwen_serve.v1 import generate_pb2 as pb

    request = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(temperature=0.0),
                                 stopping=pb.StoppingParams(max_tokens=max_tokens, ignore_eos=True))
    record = StreamRecord(sent=time.monotonic())
    try:
        async for message in stub.Generate(request, timeout=timeout_s):
            kind = message.WhichOneof("event")
            if kind == "token" and message.token.token_ids:
                record.token_times.append(time.monotonic())
                record.token_counts.append(len(message.token.token_ids))
            elif kind == "finished":
                record.finish_reason = pb.FinishReason.Name(message.finished.reason)
                record.completion_tokens = message.finished.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    record.ended = time.monotonic()
    return record
