"""Run a complete front-end (and its worker) on an asyncio loop in a background thread.

For embedding the service in another program and for tests that talk to a real server through
real gRPC while inspecting it:

    with BackgroundServer(ServeConfig(port=0, model_path=path, backend="cpu")) as server:
        server.target          # "127.0.0.1:PORT"
        server.call(coro)      # run a coroutine on the server's loop, get its result
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from server.app import RunningServer, start_server, stop_server
from server.config import ServeConfig

T = TypeVar("T")


class BackgroundServer:
    def __init__(self, config: ServeConfig, worker_factory: Callable[..., Any] | None = None,
                 ready_timeout_s: float = 300.0) -> None:
        self.config = config
        self.worker_factory = worker_factory
        self.ready_timeout_s = ready_timeout_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="qwen-serve-loop", daemon=True)
        self.running: RunningServer | None = None

    @property
    def target(self) -> str:
        if self.running is None:
            raise RuntimeError("server not started")
        return f"{self.config.host}:{self.running.port}"

    def call(self, coroutine: Coroutine[Any, Any, T], timeout_s: float | None = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    async def _wait_ready(self) -> None:
        if self.running is None:
            raise RuntimeError("server not started")
        error = await asyncio.wait_for(asyncio.shield(self.running.link.started), self.ready_timeout_s)
        if error is not None:
            raise RuntimeError(f"the worker did not start: {error}") from error

    def start(self) -> Self:
        self.thread.start()
        self.running = self.call(start_server(self.config, self.worker_factory))
        self.call(self._wait_ready(), timeout_s=None)
        return self

    def stop(self, grace_s: float = 1.0) -> None:
        if self.running is not None:
            self.call(stop_server(self.running, grace_s), timeout_s=None)
            self.running = None
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
