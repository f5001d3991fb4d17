"""Method handlers for QwenServe, built here rather than with the generated `add_..._to_server` so
that request bytes that do not parse become INVALID_ARGUMENT (not INTERNAL) through a tolerant
deserializer."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from qwen_serve.v1 import generate_pb2 as pb
from server.servicer import MalformedRequest, QwenServeServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["QwenServe"].full_name   # "qwen_serve.v1.QwenServe"


def _tolerant_parser(message_type: type[Message]) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as error:   # incl. invalid UTF-8 in string fields
            return MalformedRequest(error)
    return parse


def _serialize(message: Message) -> bytes:
    return bytes(message.SerializeToString())


def qwen_serve_handler(servicer: QwenServeServicer) -> grpc.GenericRpcHandler:
    def unary(method: Callable[..., Any], request_type: type[Message]) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            method, request_deserializer=_tolerant_parser(request_type), response_serializer=_serialize)

    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate, request_deserializer=_tolerant_parser(pb.GenerateRequest),
            response_serializer=_serialize),
        "Complete": unary(servicer.Complete, pb.GenerateRequest),
        "Tokenize": unary(servicer.Tokenize, pb.TokenizeRequest),
        "Detokenize": unary(servicer.Detokenize, pb.DetokenizeRequest),
        "GetModelInfo": unary(servicer.GetModelInfo, pb.GetModelInfoRequest),
        "Abort": unary(servicer.Abort, pb.AbortRequest),
    }
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
