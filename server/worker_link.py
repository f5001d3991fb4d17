"""The front-end's view of the model: the worker client plus what is derived from the model file
(tokenizer, chat template, limits). Requests before the worker is ready get UNAVAILABLE.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.text.tokenizer import Tokenizer
from server.config import ServeConfig
from server.errors import RpcError
from server.logs import get_logger
from server.metrics import Metrics
from server.text import TextTools
from server.validation import ModelLimits

log = get_logger("worker_link")
STATS_INTERVAL_S = 1.0


class ServingModel:
    """Facts of the served model the servicer needs on every request."""

    def __init__(self, name: str, limits: ModelLimits, tools: TextTools, hidden_size: int) -> None:
        self.name, self.limits, self.tools, self.hidden_size = name, limits, tools, hidden_size


def _load_model_facts(model_info: dict[str, Any]) -> ServingModel:
    """Tokenizer and config from the file the worker serves (metadata only: the file is mmapped)."""
    path = str(model_info["model_path"])
    tokenizer = Tokenizer.from_gguf(path)
    with load_gguf(path) as model:
        config = model.config
    # Ids the tokenizer cannot spell cannot be detokenized: bound inputs by both vocabularies.
    vocab = min(int(model_info["vocab_size"]), tokenizer.vocab_size)
    limits = ModelLimits(vocab_size=vocab, context_length=int(model_info["context_length"]))
    tools = TextTools(tokenizer, tokenizer.chat_template, tuple(tokenizer.stop_token_ids))
    return ServingModel(Path(path).name, limits, tools, config.hidden_size)


class WorkerLink:
    def __init__(self, config: ServeConfig, metrics: Metrics,
                 worker_factory: Callable[..., Any] | None = None) -> None:
        self.config, self.metrics = config, metrics
        self._factory = worker_factory or default_worker_factory
        self.worker: Any = None
        self._model: ServingModel | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._on_change: Callable[[bool], Awaitable[None]] | None = None
        # Resolved when the first start succeeds (None) or fails (the exception): `serve` exits on failure.
        # Construct inside the running loop (start_server does).
        self.started: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    @property
    def is_serving(self) -> bool:
        return self._model is not None and self.worker is not None and bool(self.worker.is_serving)

    def model(self) -> ServingModel:
        """The served model, or UNAVAILABLE while the worker is starting or down."""
        if self._model is None or not self.is_serving:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "the model worker is not ready; retry shortly")
        return self._model

    def start(self, on_serving_change: Callable[[bool], Awaitable[None]]) -> None:
        self._on_change = on_serving_change
        self._tasks.append(asyncio.create_task(self._start_worker()))

    async def _start_worker(self) -> None:
        try:
            began = time.monotonic()
            log.info("starting the model worker (this loads the weights and runs a warm-up step)"
                     if not self.config.attach_dir else f"attaching to the worker in {self.config.attach_dir}")
            self.worker = self._factory(self.config)
            self.worker.on_state_change(self._on_worker_state)
            await self.worker.start()
            self._model = await asyncio.to_thread(_load_model_facts, dict(self.worker.model_info))
            info = self.worker.model_info
            log.info(f"model {self._model.name} ready on {info.get('backend')} ({info.get('device_name')}) "
                     f"after {time.monotonic() - began:.1f} s")
            await self._state_changed(self.worker.is_serving)
            self._tasks.append(asyncio.create_task(self._poll_stats()))
        except Exception as error:
            log.exception("the model worker failed to start")
            if not self.started.done():
                self.started.set_result(error)
            return
        if not self.started.done():
            self.started.set_result(None)

    def _on_worker_state(self, serving: bool) -> None:
        """The worker client's callback (plain function): health follows in a task on this loop."""
        if self._model is None:
            return   # first start: _start_worker reports SERVING once the model facts are loaded
        if serving:
            self.metrics.worker_restarted()   # serving again after the first start: a restart
        self._tasks.append(asyncio.get_running_loop().create_task(self._state_changed(serving)))

    async def _state_changed(self, serving: bool) -> None:
        log.info("worker %s", "serving" if serving else "not serving")
        if self._on_change is not None:
            await self._on_change(serving and self._model is not None)

    async def _poll_stats(self) -> None:
        """Engine gauges (running, waiting, KV blocks) into the metrics, from the stats the worker
        pushes once a second (no round trip)."""
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            stats = dict(getattr(self.worker, "latest_stats", None) or {})
            if not self.is_serving or not stats:
                continue
            self.metrics.set_running(int(stats.get("running", 0)))
            self.metrics.set_queue_depth(int(stats.get("waiting", 0)))
            self.metrics.set_kv_blocks(int(stats.get("kv_blocks_used", 0)), int(stats.get("kv_blocks_free", 0)))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self.worker is not None:
            await self.worker.close()


def resolve_model_path(config: ServeConfig) -> str:
    if config.model_path:
        return config.model_path
    from gpu_worker.model.fetch import fetch_default_model  # downloads once, then the cached file

    return str(fetch_default_model())


def default_worker_factory(config: ServeConfig) -> Any:
    from server.worker_client import WorkerClient  # written by the engine helper

    options: dict[str, Any] = {"max_batch": config.max_batch}
    if not config.prefix_cache:
        options["prefix_cache"] = False
    if config.kv_cache_gb is not None:
        options["kv_cache_gb"] = config.kv_cache_gb
    if config.max_tokens_per_step is not None:
        options["max_tokens_per_step"] = config.max_tokens_per_step
    if config.attach_dir:   # the worker already has its model; the path is informational here
        return WorkerClient(config.model_path or "", backend=config.backend, socket_dir=config.attach_dir,
                            attach=True, stream_messages_per_s=config.stream_messages_per_s, **options)
    return WorkerClient(resolve_model_path(config), backend=config.backend,
                        stream_messages_per_s=config.stream_messages_per_s, **options)
