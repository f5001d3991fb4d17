"""Errors the front-end ends a call with."""
from __future__ import annotations

import grpc


class RpcError(Exception):
    """A gRPC status to end the call with (trailing: extra trailing metadata, e.g. a retry hint)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailing: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code, self.message, self.trailing = code, message, trailing
