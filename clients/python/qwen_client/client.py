"""`QwenClient`: a typed, synchronous client for qwen-serve.

    from qwen_client import QwenClient, GenerateOptions
    with QwenClient("127.0.0.1:50051") as client:
        for event in client.generate("Write a haiku", GenerateOptions(temperature=0.7, seed=1)):
            ...                                  # Started, then TokenDelta..., then Finished
        text = client.complete("2+2=", GenerateOptions(temperature=0)).text
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwen_client import _proto
from qwen_client.types import Completion, Event, GenerateOptions, Tokens
from qwen_serve.v1 import generate_pb2 as pb
from qwen_serve.v1 import generate_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class QwenError(Exception):
    """A call failed; `code` is the gRPC status name (e.g. "INVALID_ARGUMENT"), `details` the message."""

    def __init__(self, code: str, details: str, retry_after_ms: int | None = None) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details, self.retry_after_ms = code, details, retry_after_ms


def _translate(error: grpc.RpcError) -> QwenError:
    code = error.code().name if hasattr(error, "code") and error.code() else "UNKNOWN"
    details = error.details() if hasattr(error, "details") else str(error)
    retry = None
    for key, value in (error.trailing_metadata() or ()) if hasattr(error, "trailing_metadata") else ():
        if key == "grpc-retry-pushback-ms" and str(value).isdigit():
            retry = int(value)
    return QwenError(code, details or "", retry)


class QwenClient:
    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: bool = False,
                 root_certificates: bytes | None = None, timeout_s: float | None = None,
                 server_name_override: str | None = None) -> None:
        options: list[tuple[str, Any]] = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                          ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
        if server_name_override:
            options.append(("grpc.ssl_target_name_override", server_name_override))
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout_s = timeout_s
        self._stub = pb_grpc.QwenServeStub(self._channel)  # type: ignore[no-untyped-call]
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, request_id: str = "") -> Any:
        metadata = self._metadata + ((("x-request-id", request_id),) if request_id else ())
        try:
            return method(request, timeout=self._timeout_s, metadata=metadata)
        except grpc.RpcError as error:
            raise _translate(error) from None

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, prompt: str | None = None, options: GenerateOptions | None = None, *,
                 messages: _proto.Messages | None = None, token_ids: Sequence[int] | None = None,
                 add_generation_prompt: bool = True) -> Iterator[Event]:
        """Stream events as they arrive: one Started, TokenDelta..., one Finished."""
        options = options or GenerateOptions()
        request = _proto.generate_request(prompt, messages, token_ids, options, add_generation_prompt)
        stream = self._call(self._stub.Generate, request, options.request_id)
        try:
            for message in stream:
                yield _proto.event(message)
        except grpc.RpcError as error:
            raise _translate(error) from None
        finally:
            stream.cancel()   # no-op after the end; frees the server's request if we stop early

    def chat(self, messages: _proto.Messages, options: GenerateOptions | None = None) -> Iterator[Event]:
        return self.generate(None, options, messages=messages)

    def complete(self, prompt: str | None = None, options: GenerateOptions | None = None, *,
                 messages: _proto.Messages | None = None, token_ids: Sequence[int] | None = None,
                 add_generation_prompt: bool = True) -> Completion:
        options = options or GenerateOptions()
        request = _proto.generate_request(prompt, messages, token_ids, options, add_generation_prompt)
        return _proto.completion(self._call(self._stub.Complete, request, options.request_id))

    # -- everything else ----------------------------------------------------------------------------
    def tokenize(self, text: str | None = None, *, messages: _proto.Messages | None = None,
                 add_generation_prompt: bool = True) -> Tokens:
        if (text is None) == (messages is None):
            raise ValueError("give exactly one of text or messages")
        request = (pb.TokenizeRequest(text=text) if text is not None
                   else pb.TokenizeRequest(chat=_proto.chat_messages(messages or (), add_generation_prompt)))
        response = self._call(self._stub.Tokenize, request)
        return Tokens(tuple(response.ids), tuple(response.pieces))

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self._call(self._stub.Detokenize, pb.DetokenizeRequest(ids=list(ids))).text)

    def model_info(self) -> dict[str, Any]:
        from google.protobuf.json_format import MessageToDict

        response = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest())
        try:
            return dict(MessageToDict(response, preserving_proto_field_name=True,
                                      always_print_fields_with_no_presence=True))
        except TypeError:   # protobuf < 5.26 names the option differently
            return dict(MessageToDict(response, preserving_proto_field_name=True,
                                      including_default_value_fields=True))

    def abort(self, request_id: str) -> bool:
        return bool(self._call(self._stub.Abort, pb.AbortRequest(request_id=request_id)).found)

    def health(self, service: str = "") -> str:
        """"SERVING", "NOT_SERVING", ... as the standard grpc.health.v1 service reports it."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
