"""Front-end side of the worker: spawn or attach, route events per request, supervise.

API (used by server.servicer; everything runs on one asyncio loop):
    client = WorkerClient(model_path, backend="auto", socket_dir=None, attach=False, **worker_opts)
    await client.start()          # spawn `python -m gpu_worker.worker_main` (or attach), wait for ready
    client.model_info: dict       # architecture, quant_types, context_length, vocab_size, weight_bytes,
                                  # kv_bytes, kv_block_size, kv_blocks_total, backend, device_name, ...
    async for ev in client.generate(request_id, prompt_ids, sampling, stopping):
        TokenEvent(token_id, logprobs) ..., then exactly one FinishedEvent(reason, prompt_tokens,
        completion_tokens, queue_ns, ttft_ns, decode_ns); reason in eos | length | stop | cancelled.
        Raises WorkerUnavailable (worker down, or died mid-stream: at once for every in-flight
        request) or WorkerRequestError (the worker rejected it, e.g. prompt larger than the KV cache).
        Closing the generator early (client cancel) aborts the request in the worker.
    async for batch in client.generate_batches(...same arguments...):
        the same events, as lists: everything that arrived for the request since the consumer last
        asked (one list per wake-up; at most one FinishedEvent, always last). What the servicer uses,
        so that tokens that pile up while the front-end is busy leave in one gRPC message. With
        stream_messages_per_s set, a stream is woken at most once per generating streams /
        stream_messages_per_s seconds (its first token and its end at once): see _Pacing.
    await client.abort(request_id) -> bool   # False when not in flight; its stream ends "cancelled"
    await client.stats() -> dict             # kv_blocks_total/used/free, running, waiting, steps, ...
    client.latest_stats: dict                # the same, pushed by the worker once a second
    client.is_serving; client.on_state_change(callback(serving: bool)); client.restart_count
    await client.close()
Supervision: socket EOF (exit, crash, kill -9), a heartbeat stalled for `heartbeat_timeout_s`
(frozen process) or an engine loop stalled for `step_timeout_s` (a step that never returns) fails
the in-flight requests, removes the dead worker's /dev/shm segments and restarts an owned
worker (SIGKILL first, in case it hangs); an attached client reconnects when the worker is back.
EOS / stop-id tokens that end a request are not emitted as TokenEvents.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from gpu_worker.backends.base import TokenLogprobs
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.ipc import messages
from gpu_worker.ipc.client_endpoint import ClientConnection
from gpu_worker.ipc.worker_process import WorkerProcess
from gpu_worker.sampling.params import SamplingParams, StoppingParams

log = logging.getLogger("qwen_serve.worker_client")
WAKES_PER_ROUND = 16   # request streams woken per event-loop iteration (_WakeQueue)
# A paced token may go out this much before its stream's interval ends: the loop's timers can fire a
# hair early, and tokens due within a millisecond are not worth a second wake-up.
PACING_SLACK_S = 0.001


class WorkerUnavailable(RuntimeError):
    """The worker is down or died while the request was in flight (maps to gRPC UNAVAILABLE)."""


class WorkerRequestError(RuntimeError):
    """The worker refused or failed this one request (message says why)."""


class TokenEvent(NamedTuple):
    """One per token per stream: a NamedTuple, cheaper to build than a frozen dataclass."""

    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class FinishedEvent:
    reason: str                 # eos | length | stop | cancelled
    prompt_tokens: int
    completion_tokens: int
    queue_ns: int
    ttft_ns: int
    decode_ns: int


StreamItem = TokenEvent | FinishedEvent | BaseException


class _Pacing:
    """How often one stream may be handed its tokens. Every token delivered alone costs the front-end
    a wake-up, a gRPC message and a socket write; with hundreds of streams that work filled the event
    loop, and grpc.aio, which accepts one new RPC per handful of loop iterations, took a burst of new
    requests in over a second (docs/gpu_results/serving_profile_h200.md). With `messages_per_s` set,
    each stream is woken at most once per `interval_s` = generating streams / messages_per_s, so the
    whole front-end sends about that many token messages per second at most, each carrying whatever
    tokens arrived meanwhile. A stream counts from its first token to its end (requests still queued
    in the worker send nothing). Its first token and its end (or failure) are always delivered at
    once. 0 turns pacing off: every token is handed over as soon as it arrives."""

    __slots__ = ("generating", "interval_s", "messages_per_s")

    def __init__(self, messages_per_s: float) -> None:
        if not (messages_per_s >= 0 and math.isfinite(messages_per_s)):
            raise ValueError(f"stream messages per second must be >= 0, got {messages_per_s}")
        self.messages_per_s = messages_per_s
        self.generating = 0
        self.interval_s = 0.0

    def stream_started(self) -> None:
        self._set_generating(self.generating + 1)

    def stream_ended(self) -> None:
        self._set_generating(self.generating - 1)

    def _set_generating(self, count: int) -> None:
        self.generating = count
        self.interval_s = count / self.messages_per_s if self.messages_per_s else 0.0


class _Mailbox:
    """One request's undelivered events. The reader takes all of them at once and is woken once per
    delivery round, not once per token (asyncio.Queue would wake it, and be read, per item). With
    pacing, tokens that arrive less than the pacing interval after the last delivery wait for a
    timer (or for an urgent item: the finish or a failure)."""

    __slots__ = ("_not_before", "_pacing", "_timer", "_urgent", "_waiter", "_wakes", "items", "wake_queued")

    def __init__(self, pacing: _Pacing | None = None, wakes: _WakeQueue | None = None) -> None:
        self.items: list[StreamItem] = []
        self._waiter: asyncio.Future[None] | None = None
        self.wake_queued = False     # in WorkerClient's wake queue (_WakeQueue)
        self._pacing = pacing
        self._wakes = wakes          # where the pacing timer queues the wake-up (None: wake at once)
        self._not_before = 0.0       # loop time before which plain tokens are not handed over
        self._urgent = False         # an item that must not wait for the pacing interval is queued
        self._timer: asyncio.TimerHandle | None = None

    def put(self, item: StreamItem) -> None:
        """Add an urgent item (a failure) and wake the reader now."""
        self.items.append(item)
        self._urgent = True
        self.wake()

    def add(self, item: StreamItem, urgent: bool = False) -> bool:
        """Add an item without waking the reader; True when it waits and needs a wake() now. A plain
        token inside the pacing interval arms the pacing timer instead."""
        self.items.append(item)
        self._urgent = self._urgent or urgent
        waiter = self._waiter
        if waiter is None or waiter.done():
            return False
        if self._urgent or not self._not_before or time.monotonic() >= self._not_before - PACING_SLACK_S:
            return True
        self._arm_timer(waiter.get_loop())
        return False

    def wake(self) -> None:
        if self._reader_waits():
            self._waiter.set_result(None)

    def _reader_waits(self) -> bool:
        waiter = self._waiter
        return waiter is not None and not waiter.done()

    def _arm_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None:
            self._timer = loop.call_at(self._not_before, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._wakes is None:
            self.wake()
        elif self._reader_waits():
            self._wakes.push(self)
            self._wakes.start()

    def _ready(self, now: float) -> bool:
        return bool(self.items) and (self._urgent or now >= self._not_before - PACING_SLACK_S)

    async def take_all(self) -> list[StreamItem]:
        loop = asyncio.get_running_loop()
        while not self._ready(loop.time()):
            if self.items:                 # plain tokens inside the pacing interval
                self._arm_timer(loop)
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items, self.items = self.items, []
        self._urgent = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        interval = self._pacing.interval_s if self._pacing is not None else 0.0
        self._not_before = loop.time() + interval if interval else 0.0
        return items


class _WakeQueue:
    """Wakes the readers of mailboxes that received events, at most `per_round` per loop iteration.

    grpc.aio accepts one new RPC per event-loop iteration (its server loop awaits one request_call at
    a time). Woken all at once, hundreds of streams (each then detokenizing and writing a gRPC
    message) made iterations long, and a burst of new requests was taken in slowly, some only after
    the first ones had finished. Spread over iterations, the same work leaves room for the accepts.
    256 streams on the serving path alone (benchmarks.free_forward_worker, 4 ms steps, H200 host, 16
    cores, six runs each): aggregate 14.1-17.4k -> 17.4-19.9k tok/s, last arrival at the worker
    1.26-1.72 s -> 1.04-1.26 s after the first send. With the real model the 256-stream runs stayed as
    spread as before (docs/gpu_results/serving_profile_h200.md, session 11)."""

    def __init__(self, per_round: int) -> None:
        self.per_round = per_round
        self._queue: deque[_Mailbox] = deque()
        self._scheduled = False

    def push(self, mailbox: _Mailbox) -> None:
        if not mailbox.wake_queued:
            mailbox.wake_queued = True
            self._queue.append(mailbox)

    def wake_round(self) -> None:
        """Wake the next per_round readers; the rest in the next iteration (call_soon)."""
        self._scheduled = False
        queue = self._queue
        for _ in range(min(self.per_round, len(queue))):
            mailbox = queue.popleft()
            mailbox.wake_queued = False
            mailbox.wake()
        if queue:                          # _scheduled was cleared above: nothing else is scheduled
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.wake_round)

    def start(self) -> None:
        """After a batch of pushes: wake a round now unless one is already scheduled."""
        if self._queue and not self._scheduled:
            self.wake_round()


@dataclass
class _Stream:
    request_id: str
    key: int
    mailbox: _Mailbox
    finished: bool = False


class WorkerClient:
    def __init__(self, model_path: str, backend: str = "auto", socket_dir: str | None = None,
                 attach: bool = False, heartbeat_timeout_s: float = 5.0, step_timeout_s: float = 300.0,
                 start_timeout_s: float = 600.0, restart: bool = True, stream_messages_per_s: float = 0.0,
                 **worker_opts: object) -> None:
        self.process = WorkerProcess(model_path, backend, socket_dir, attach, worker_opts)
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.step_timeout_s = step_timeout_s
        self.start_timeout_s = start_timeout_s
        self.restart_enabled = restart
        self.model_info: dict[str, Any] = {}
        self.latest_stats: dict[str, Any] = {}     # the worker's unsolicited stats, once a second
        self.restart_count = 0
        self._conn: ClientConnection | None = None
        self._streams: dict[int, _Stream] = {}
        self._keys: dict[str, int] = {}
        self._key_counter = itertools.count(1)
        self._outbound: deque[tuple[int, bytes]] = deque()
        self._stats_waiters: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._wakes = _WakeQueue(WAKES_PER_ROUND)
        self._pacing = _Pacing(stream_messages_per_s)
        self._callbacks: list[Callable[[bool], None]] = []
        self._serving = False
        self._closing = False
        self._recover_task: asyncio.Task[None] | None = None
        self._watchdog_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        await self._connect_fresh()
        self._watchdog_task = asyncio.create_task(self._watchdog())

    async def _connect_fresh(self) -> None:
        self._conn = await self.process.start_and_connect(self.start_timeout_s)
        self.model_info = self._conn.model_info
        asyncio.get_running_loop().add_reader(self._conn.sock.fileno(), self._on_readable)
        self._set_serving(True)

    async def close(self) -> None:
        self._closing = True
        for task in (self._watchdog_task, self._recover_task):
            if task is not None:
                task.cancel()
        # SHUTDOWN lets the worker free its segments and exit 0; where it cannot be sent (no
        # connection, full ring) the owned worker is killed instead of waiting out the grace period.
        shutdown_sent = (self.process.owned and self._conn is not None
                         and self._conn.try_send(messages.SHUTDOWN, b""))
        await self.process.stop(kill=not shutdown_sent)
        self._drop_connection(WorkerUnavailable("worker client closed"))
        self.process.cleanup()

    @property
    def is_serving(self) -> bool:
        return self._serving

    @property
    def request_ring_full_count(self) -> int:
        """Times a send waited for ring space on the current connection (back-pressure)."""
        return self._conn.num_request_ring_full if self._conn else 0

    @property
    def worker_pid(self) -> int | None:
        return self._conn.worker_pid if self._conn else None

    def on_state_change(self, callback: Callable[[bool], None]) -> None:
        self._callbacks.append(callback)

    def _set_serving(self, serving: bool) -> None:
        if serving != self._serving:
            self._serving = serving
            for cb in list(self._callbacks):
                cb(serving)

    # --- requests ------------------------------------------------------------------------------
    async def generate(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                       stopping: StoppingParams) -> AsyncIterator[TokenEvent | FinishedEvent]:
        batches = self.generate_batches(request_id, prompt_ids, sampling, stopping)
        async with contextlib.aclosing(batches):     # closing this one closes (and aborts) that one
            async for batch in batches:
                for event in batch:
                    yield event

    async def generate_batches(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                               stopping: StoppingParams) -> AsyncGenerator[list[TokenEvent | FinishedEvent], None]:
        if not self._serving or self._conn is None:
            raise WorkerUnavailable("worker is not serving")
        if request_id in self._keys:
            raise ValueError(f"request id {request_id!r} is already in flight")
        key = next(self._key_counter)
        spec = RequestSpec(key, tuple(int(t) for t in prompt_ids), sampling, stopping)
        stream = _Stream(request_id, key, _Mailbox(self._pacing, self._wakes))
        self._streams[key], self._keys[request_id] = stream, key
        conn = self._conn
        generating = False
        try:
            self._send(messages.SUBMIT, messages.encode_submit(spec))
            while True:
                batch: list[TokenEvent | FinishedEvent] = []
                items = await stream.mailbox.take_all()
                if not generating:
                    generating = True
                    self._pacing.stream_started()
                for item in items:
                    if isinstance(item, BaseException):
                        if batch:
                            yield batch          # the tokens that came before the failure first
                        raise item
                    batch.append(item)
                    if isinstance(item, FinishedEvent):
                        yield batch              # anything after it (a later worker loss) is moot
                        return
                yield batch
        finally:
            self._streams.pop(key, None)
            self._keys.pop(request_id, None)
            if generating:
                self._pacing.stream_ended()
            if not stream.finished and conn is self._conn and self._serving:
                self._send(messages.ABORT, messages.encode_key(key))

    async def abort(self, request_id: str) -> bool:
        key = self._keys.get(request_id)
        if key is None or not self._serving:
            return False
        self._send(messages.ABORT, messages.encode_key(key))
        return True

    async def stats(self, timeout_s: float = 10.0) -> dict[str, Any]:
        if not self._serving:
            raise WorkerUnavailable("worker is not serving")
        nonce = next(self._key_counter)
        future = asyncio.get_running_loop().create_future()
        self._stats_waiters[nonce] = future
        try:
            self._send(messages.STATS_REQUEST, messages.encode_key(nonce))
            return await asyncio.wait_for(future, timeout_s)
        finally:
            self._stats_waiters.pop(nonce, None)

    def _send(self, msg_type: int, payload: bytes) -> None:
        """Send in order; records that do not fit wait in `_outbound` until the worker reads."""
        self._outbound.append((msg_type, payload))
        self._flush_outbound()

    def _flush_outbound(self) -> None:
        while self._outbound and self._conn is not None:
            if not self._conn.try_send(*self._outbound[0]):
                return
            self._outbound.popleft()

    # --- events --------------------------------------------------------------------------------
    def _on_readable(self) -> None:
        conn = self._conn
        if conn is None:
            return
        if not conn.drain_wakes():
            self._worker_lost("worker closed the connection")
            return
        for msg_type, payload in conn.receive():
            self._dispatch(msg_type, payload)
        self._wakes.start()
        self._flush_outbound()

    def _dispatch(self, msg_type: int, payload: bytes) -> None:
        if msg_type == messages.TOKENS:
            streams, wakes = self._streams, self._wakes
            for key, token_id, logprobs in zip(*messages.decode_token_columns(payload)):
                stream = streams.get(key)
                if stream is not None and stream.mailbox.add(TokenEvent(token_id, logprobs)):
                    wakes.push(stream.mailbox)
        elif msg_type == messages.FINISHED:
            fin = messages.decode_finished(payload)
            stream = self._streams.get(fin.request_key)
            if stream is None:
                return
            stream.finished = True
            if fin.reason == "error":
                item: StreamItem = WorkerRequestError(fin.message)
            else:
                item = FinishedEvent(fin.reason, fin.prompt_tokens, fin.completion_tokens,
                                     fin.queue_ns, fin.ttft_ns, fin.decode_ns)
            if stream.mailbox.add(item, urgent=True):
                self._wakes.push(stream.mailbox)
        elif msg_type == messages.STATS:
            stats = messages.decode_stats(payload)
            nonce = int(stats.pop("nonce", 0))
            if nonce == 0:
                self.latest_stats = stats
            future = self._stats_waiters.get(nonce)
            if future is not None and not future.done():
                future.set_result(stats)

    # --- supervision ---------------------------------------------------------------------------
    def _worker_lost(self, reason: str) -> None:
        if self._conn is None:
            return
        if self._closing:       # expected EOF; stop watching the socket (EOF stays readable)
            asyncio.get_running_loop().remove_reader(self._conn.sock.fileno())
            return
        log.error("worker lost: %s", reason)
        self._drop_connection(WorkerUnavailable(f"worker unavailable: {reason}"))
        self._set_serving(False)
        self._recover_task = asyncio.create_task(self._recover())

    def _drop_connection(self, error: BaseException) -> None:
        """Fail every in-flight request at once and forget the connection (segments unlinked)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            asyncio.get_running_loop().remove_reader(conn.sock.fileno())
            conn.close(unlink=True)
        for stream in self._streams.values():
            stream.finished = True
            stream.mailbox.put(type(error)(*error.args))   # one exception object per stream
        self._streams.clear()
        self._keys.clear()
        self._outbound.clear()
        for future in self._stats_waiters.values():
            if not future.done():
                future.set_exception(error)

    async def _recover(self) -> None:
        if not self.restart_enabled:
            return
        await self.process.stop(kill=True)
        while not self._closing:
            try:
                await self._connect_fresh()
                self.restart_count += 1
                log.info("worker serving again (restart %d)", self.restart_count)
                return
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("worker restart failed: %s; retrying", exc)
                await self.process.stop(kill=True)
                await asyncio.sleep(1.0)

    async def _watchdog(self) -> None:
        """Two counters in the event ring header: the worker's heartbeat thread (frozen process,
        e.g. SIGSTOP or a GIL deadlock) and its main loop (a step that never returns)."""
        loop = asyncio.get_running_loop()
        conn, seen = None, (-1, -1)
        changed_at = [loop.time(), loop.time()]
        period = min(0.25, self.heartbeat_timeout_s / 4)
        while not self._closing:
            await asyncio.sleep(period)
            now = loop.time()
            if self._conn is None or self._conn is not conn:
                conn, seen, changed_at = self._conn, (-1, -1), [now, now]
                continue
            current = (conn.heartbeat(), conn.progress())
            for i in (0, 1):
                if current[i] != seen[i]:
                    changed_at[i] = now
            seen = current
            if now - changed_at[0] > self.heartbeat_timeout_s:
                self._worker_lost(f"no heartbeat for {now - changed_at[0]:.1f} s")
            elif now - changed_at[1] > self.step_timeout_s:
                self._worker_lost(f"engine loop stuck for {now - changed_at[1]:.1f} s")
