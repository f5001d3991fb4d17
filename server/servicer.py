"""The QwenServe servicer: validation → text → admission → worker, errors as gRPC statuses."""
from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from qwen_serve.v1 import generate_pb2 as pb
from server import convert
from server.admission import AdmissionGate
from server.config import ServeConfig
from server.errors import RpcError
from server.generation import Generation, GenerationJob
from server.interceptors import new_request_id
from server.logs import get_logger, request_id_var
from server.metrics import Metrics
from server.requests import ClientRequest, FinishedEvent, GenerationEvent, InputKind
from server.validation import RequestInvalid, validate_lengths, validate_request
from server.worker_client import WorkerRequestError, WorkerUnavailable
from server.worker_link import WorkerLink

DEADLINE_TOLERANCE_S = 0.05   # see _cancelled
log = get_logger("servicer")
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"   # the standard gRPC retry hint (trailing metadata)


class MalformedRequest:
    """Stands in for a request whose bytes did not parse (tolerant deserializer → INVALID_ARGUMENT)."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _outcome_of(code: grpc.StatusCode) -> str:
    return code.name.lower() if code.name.lower() in (
        "invalid_argument", "resource_exhausted", "unavailable", "deadline_exceeded", "cancelled") else "error"


class QwenServeServicer:
    def __init__(self, link: WorkerLink, metrics: Metrics, config: ServeConfig) -> None:
        self.link, self.metrics = link, metrics
        self.gate = AdmissionGate(config.max_batch, config.max_queue)
        self.log_requests = config.log_requests
        self.running: dict[str, Generation] = {}     # by worker_request_id
        self._call_numbers = itertools.count(1)

    # -- generation --------------------------------------------------------------------------------
    async def _prepare(self, message: Any, context: grpc.aio.ServicerContext) -> GenerationJob:
        arrival_ns = time.monotonic_ns()
        if isinstance(message, MalformedRequest):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"request: not a valid GenerateRequest ({message.error})")
        model = self.link.model()
        request = convert.request_from_proto(message)
        validate_request(request, model.limits)
        request_id = request.request_id or (request_id_var.get() if request_id_var.get() != "-" else "")
        request_id = request_id or new_request_id()
        request_id_var.set(request_id)
        try:
            if request.input_kind is InputKind.TOKEN_IDS:   # nothing to tokenize: no thread hop per request
                prompt_ids = model.tools.prompt_ids(request)
            else:
                prompt_ids = await asyncio.to_thread(model.tools.prompt_ids, request)
        except ValueError as error:   # e.g. the model's chat template rejects the conversation
            raise RequestInvalid("chat.messages" if request.messages else "prompt", str(error)) from None
        validate_lengths(request, len(prompt_ids), model.limits)
        seed = request.seed if request.seed is not None else secrets.randbits(64)
        if self.log_requests:
            log.debug("request content", extra={"fields": {"input": _describe_input(request)}})
        return GenerationJob(
            request_id=request_id, worker_request_id=f"{request_id}#{next(self._call_numbers)}",
            model=model.name, prompt_ids=prompt_ids,
            sampling=request.sampling_params(seed),
            stopping=request.stopping_params(len(prompt_ids), model.limits.context_length,
                                             model.tools.eos_token_ids),
            stops=request.stop, arrival_ns=arrival_ns)

    async def _run(self, message: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[GenerationEvent]:
        """Admit, run, and account one request; every failure becomes an RpcError."""
        try:
            job = await self._prepare(message, context)
        except RequestInvalid as error:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from None
        generation = Generation(self.link.worker, self.link.model().tools, self.metrics, job)
        refusal = self.gate.try_admit()
        if refusal is not None:
            raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal.message,
                           ((RETRY_PUSHBACK_KEY, str(refusal.retry_after_ms)),))
        self.running[job.worker_request_id] = generation
        log.info("generation started", extra={"fields": {"prompt_tokens": len(job.prompt_ids),
                                                         "max_tokens": job.stopping.max_tokens}})
        try:
            async for event in generation.events():
                if isinstance(event, FinishedEvent):
                    self._account(event)
                yield event
        except WorkerUnavailable as error:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, f"the model worker went away: {error}") from None
        except WorkerRequestError as error:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"the worker refused the request: {error}") from None
        finally:
            self.running.pop(job.worker_request_id, None)
            self.gate.release()
            if not generation.finished:
                # Client cancel, disconnect or deadline: free the request's KV in the worker now.
                await _quietly(self.link.worker.abort(job.worker_request_id))
                self.metrics.add_tokens(prompt=len(job.prompt_ids), generated=generation.completion_tokens)

    def _account(self, event: FinishedEvent) -> None:
        self.metrics.request_finished(event.reason.value)
        self.metrics.add_tokens(prompt=event.prompt_tokens, generated=event.completion_tokens)
        log.info("generation finished", extra={"fields": {
            "reason": event.reason.value, "completion_tokens": event.completion_tokens,
            "ttft_ms": round(event.time_to_first_token_ns / 1e6, 3)}})

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        counted = False   # the Finished event went out: _run has counted the request's outcome
        try:
            async for event in self._run(request, context):
                counted = isinstance(event, FinishedEvent)
                yield convert.event_to_proto(event)
        except RpcError as error:
            await self._abort(context, error)
        except (asyncio.CancelledError, GeneratorExit):
            # A cancel that lands while grpc sends our last message never enters this generator:
            # it is closed later (GeneratorExit at the yield) and must be counted all the same,
            # unless that last message was the Finished event, whose outcome is counted already.
            if not counted:
                self._cancelled(context)
            raise

    async def Complete(self, request: Any, context: grpc.aio.ServicerContext) -> pb.CompleteResponse:
        try:
            events = [event async for event in self._run(request, context)]
        except RpcError as error:
            await self._abort(context, error)
        except asyncio.CancelledError:
            self._cancelled(context)
            raise
        return convert.complete_to_proto(events)

    async def _abort(self, context: grpc.aio.ServicerContext, error: RpcError) -> None:
        self.metrics.request_finished(_outcome_of(error.code))
        log.info("request failed", extra={"fields": {"code": error.code.name, "error": error.message}})
        if error.trailing:
            context.set_trailing_metadata(error.trailing)
        await context.abort(error.code, error.message)

    def _cancelled(self, context: grpc.aio.ServicerContext) -> None:
        # The client's own deadline timer fires first and cancels the call, so the server usually sees a
        # cancel with a few milliseconds still on its clock; a cancel that close to the deadline is the
        # deadline's doing.
        remaining = context.time_remaining()
        near_deadline = remaining is not None and remaining <= DEADLINE_TOLERANCE_S
        outcome = "deadline_exceeded" if near_deadline else "cancelled"
        self.metrics.request_finished(outcome)
        log.info("request ended by the client", extra={"fields": {"outcome": outcome}})

    # -- the rest of the API ---------------------------------------------------------------------------
    async def Tokenize(self, request: Any, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        try:
            if isinstance(request, MalformedRequest):
                raise RequestInvalid("request", f"not a valid TokenizeRequest ({request.error})")
            model = self.link.model()
            client_request = convert.tokenize_input_from_proto(request)
            validate_request(client_request, model.limits)
            ids = await asyncio.to_thread(model.tools.prompt_ids, client_request)
        except (RequestInvalid, ValueError) as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except RpcError as error:
            await context.abort(error.code, error.message)
        return convert.tokenize_to_proto(ids, [model.tools.piece(token_id) for token_id in ids])

    async def Detokenize(self, request: Any, context: grpc.aio.ServicerContext) -> pb.DetokenizeResponse:
        try:
            model = self.link.model()
        except RpcError as error:
            await context.abort(error.code, error.message)
        vocab = model.limits.vocab_size
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid DetokenizeRequest")
        for index, token_id in enumerate(request.ids):
            if token_id >= vocab:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"ids[{index}]: token id {token_id} is outside the vocabulary [0, {vocab})")
        text = await asyncio.to_thread(model.tools.tokenizer.decode, list(request.ids))
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request: Any, context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        try:
            model = self.link.model()
            info = dict(self.link.worker.model_info)
            info.update(await self.link.worker.stats())
        except RpcError as error:
            await context.abort(error.code, error.message)
        except WorkerUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the model worker went away: {error}")
        info["model"] = model.name
        info["hidden_size"] = model.hidden_size
        return convert.model_info_to_proto(info)

    async def Abort(self, request: Any, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        if isinstance(request, MalformedRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request: not a valid AbortRequest")
        # Every running call with that id (ids are the client's choice and need not be unique).
        matching = [key for key, gen in self.running.items() if gen.job.request_id == request.request_id]
        if not matching:
            return pb.AbortResponse(found=False)
        try:
            for worker_request_id in matching:
                await self.link.worker.abort(worker_request_id)
        except WorkerUnavailable as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the model worker went away: {error}")
        return pb.AbortResponse(found=True)


async def _quietly(awaitable: Any) -> None:
    try:
        await awaitable
    except Exception:  # the worker may be gone; a dead worker holds no KV for us
        log.debug("abort after cancel failed", exc_info=True)


def _describe_input(request: ClientRequest) -> str:
    if request.messages:
        return repr(list(request.messages))
    return repr(request.prompt) if request.prompt else repr(list(request.token_ids))
