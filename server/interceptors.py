"""grpc.aio server interceptors: request id propagation and bearer-token auth.

Both wrap the method handler's behavior instead of acting in `intercept_service` itself, so that the
contextvar is set in the task that runs the handler and an auth failure is an ordinary abort.
"""
from __future__ import annotations

import hmac
import inspect
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from server.logs import request_id_var

HEALTH_SERVICE_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_SERVICE_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/",
                               "/grpc.reflection.v1.ServerReflection/")
REQUEST_ID_KEY = "x-request-id"
_BEHAVIORS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str | None:
    for entry_key, value in details.invocation_metadata or ():
        if entry_key == key:
            return value if isinstance(value, str) else None
    return None


def _wrap_behaviors(handler: grpc.RpcMethodHandler,
                    wrap: Callable[[Callable[..., Any], bool], Callable[..., Any]]) -> grpc.RpcMethodHandler:
    """Replace whichever behavior the handler has. A streaming response is either an async generator
    or a coroutine that calls `context.write` (grpc health's Watch); `wrap` is told which."""
    replaced = {}
    for name in _BEHAVIORS:
        behavior = getattr(handler, name)
        if behavior is not None:
            replaced[name] = wrap(behavior, inspect.isasyncgenfunction(behavior))
    return handler._replace(**replaced)  # RpcMethodHandler is a namedtuple


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


class RequestIdInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Takes `x-request-id` from metadata (or makes one) into `request_id_var` for the handler."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        incoming = _metadata_value(details, REQUEST_ID_KEY)
        request_id = incoming[:128] if incoming and incoming.isprintable() else new_request_id()

        def wrap(behavior: Callable[..., Any], is_generator: bool) -> Callable[..., Any]:
            if is_generator:
                async def stream_behavior(request: Any, context: Any) -> Any:
                    request_id_var.set(request_id)
                    async for response in behavior(request, context):
                        yield response
                return stream_behavior

            async def unary_behavior(request: Any, context: Any) -> Any:
                request_id_var.set(request_id)
                return await behavior(request, context)
            return unary_behavior

        return _wrap_behaviors(handler, wrap)


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Requires `authorization: Bearer <token>`; UNAUTHENTICATED otherwise. Health (and reflection,
    which reveals only the public proto) are exempt when `exempt_health` is set."""

    def __init__(self, token: str, exempt_health: bool = True) -> None:
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()
        self._exempt_health = exempt_health

    def _is_exempt(self, method: str) -> bool:
        return self._exempt_health and (method.startswith(HEALTH_SERVICE_PREFIX)
                                        or method.startswith(REFLECTION_SERVICE_PREFIXES))

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        presented = _metadata_value(details, "authorization") or ""
        return hmac.compare_digest(presented.encode("utf-8", "replace"), self._expected)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or self._is_exempt(details.method) or self._authorized(details):
            return handler

        def wrap(behavior: Callable[..., Any], is_generator: bool) -> Callable[..., Any]:
            # A coroutine behavior serves unary and streaming responses alike (nothing is written).
            async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            return deny

        return _wrap_behaviors(handler, wrap)
