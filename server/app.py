"""Assembles and runs the front-end: gRPC server (QwenServe + health + reflection), the worker client,
metrics and signal handling.

Start-up order: the gRPC port opens first with health NOT_SERVING (so orchestrators can probe while
the model loads), then the worker starts, then health turns SERVING.
"""
from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from server.config import ServeConfig
from server.handlers import SERVICE_NAME, qwen_serve_handler
from server.interceptors import BearerAuthInterceptor, RequestIdInterceptor
from server.logs import configure_logging, get_logger
from server.metrics import Metrics
from server.servicer import QwenServeServicer
from server.worker_link import WorkerLink

log = get_logger("app")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_options(config: ServeConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),   # a second server on the same port must fail, not share it
    ]


def _credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    if not config.uses_tls:
        return None
    with open(config.tls_cert or "", "rb") as cert, open(config.tls_key or "", "rb") as key:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    link: WorkerLink
    servicer: QwenServeServicer
    metrics: Metrics


async def set_health(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = SERVING if serving else NOT_SERVING
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, status)


async def start_server(config: ServeConfig, worker_factory: Callable[..., Any] | None = None) -> RunningServer:
    """Open the port, start (or attach to) the worker in the background; returns at once."""
    metrics = Metrics()
    metrics.start(config.metrics_port, host=config.host)   # same interface as gRPC (0.0.0.0 in compose)
    interceptors: list[grpc.aio.ServerInterceptor] = [RequestIdInterceptor()]
    if config.auth_token:
        interceptors.append(BearerAuthInterceptor(config.auth_token, exempt_health=config.auth_exempt_health))
    server = grpc.aio.server(interceptors=interceptors, options=grpc_options(config))
    health_servicer = health.aio.HealthServicer()
    await set_health(health_servicer, False)
    link = WorkerLink(config, metrics, worker_factory)
    servicer = QwenServeServicer(link, metrics, config)
    server.add_generic_rpc_handlers([qwen_serve_handler(servicer)])
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    credentials = _credentials(config)
    if credentials is None:
        port = server.add_insecure_port(config.address)
    else:
        port = server.add_secure_port(config.address, credentials)
    if port == 0:
        raise OSError(f"cannot listen on {config.address}")
    await server.start()

    async def on_serving_change(serving: bool) -> None:
        await set_health(health_servicer, serving)

    link.start(on_serving_change)
    return RunningServer(server, port, health_servicer, link, servicer, metrics)


async def stop_server(running: RunningServer, grace_s: float) -> None:
    """Refuse new calls, let in-flight ones finish for up to `grace_s`, then stop the worker."""
    await running.health.enter_graceful_shutdown()
    await running.server.stop(grace_s)
    await running.link.close()
    running.metrics.stop()


async def serve(config: ServeConfig) -> int:
    running = await start_server(config)
    scheme = "grpcs" if config.uses_tls else "grpc"
    log.info(f"listening on {scheme}://{config.host}:{running.port}")
    print(f"qwen-serve listening on {config.host}:{running.port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    startup = running.link.started
    stop_wait = asyncio.ensure_future(stop.wait())
    await asyncio.wait((stop_wait, startup), return_when=asyncio.FIRST_COMPLETED)
    if not stop_wait.done() and startup.result() is not None:
        log.error(f"exiting: the model worker could not start ({startup.result()})")
        stop_wait.cancel()
        await stop_server(running, 0)
        return 1
    await stop_wait
    log.info(f"shutting down: in-flight requests get up to {config.grace_period_s:g} s")
    await stop_server(running, config.grace_period_s)
    return 0


def run_server(config: ServeConfig) -> int:
    configure_logging(json_lines=config.log_json)
    return asyncio.run(serve(config))
