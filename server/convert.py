"""The only place where protobuf messages meet front-end domain objects (server/requests.py).

Nothing here validates: values are copied as received (absent `optional` fields become None) and
server/validation.py judges them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qwen_serve.v1 import generate_pb2 as pb
from server.requests import (
    ClientRequest,
    DeltaEvent,
    FinishedEvent,
    FinishReason,
    InputKind,
    StartedEvent,
    TokenLogprob,
)

_INPUT_KINDS = {"prompt": InputKind.PROMPT, "chat": InputKind.CHAT, "token_ids": InputKind.TOKEN_IDS}
_FINISH_REASONS = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}
_SAMPLING_OPTIONALS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                       "presence_penalty", "frequency_penalty", "seed")


def _optional(message: Any, name: str) -> Any:
    return getattr(message, name) if message.HasField(name) else None


def _chat_messages(chat: pb.ChatMessages) -> tuple[tuple[str, str], ...]:
    return tuple((message.role, message.content) for message in chat.messages)


def request_from_proto(request: pb.GenerateRequest) -> ClientRequest:
    kind = _INPUT_KINDS.get(request.WhichOneof("input") or "", InputKind.NONE)
    sampling, stopping = request.sampling, request.stopping
    return ClientRequest(
        input_kind=kind,
        prompt=request.prompt,
        messages=_chat_messages(request.chat),
        add_generation_prompt=request.chat.add_generation_prompt
        if request.chat.HasField("add_generation_prompt") else True,
        token_ids=tuple(request.token_ids.ids),
        **{name: _optional(sampling, name) for name in _SAMPLING_OPTIONALS},
        logit_bias=tuple(sampling.logit_bias.items()),
        max_tokens=_optional(stopping, "max_tokens"),
        stop=tuple(stopping.stop),
        stop_token_ids=tuple(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        request_id=request.request_id,
    )


def tokenize_input_from_proto(request: pb.TokenizeRequest) -> ClientRequest:
    """A TokenizeRequest as a ClientRequest with only the input set (same validation of the input)."""
    kind = {"text": InputKind.PROMPT, "chat": InputKind.CHAT}.get(request.WhichOneof("input") or "",
                                                                 InputKind.NONE)
    add_generation_prompt = (request.chat.add_generation_prompt
                             if request.chat.HasField("add_generation_prompt") else True)
    return ClientRequest(input_kind=kind, prompt=request.text, messages=_chat_messages(request.chat),
                         add_generation_prompt=add_generation_prompt)


def started_to_proto(event: StartedEvent) -> pb.Started:
    return pb.Started(request_id=event.request_id, model=event.model, prompt_tokens=event.prompt_tokens,
                      seed=event.seed)


def _logprob_to_proto(entry: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=entry.token_id, logprob=entry.logprob,
        top=[pb.TopLogprob(token_id=token_id, logprob=logprob, text=text) for token_id, logprob, text in entry.top])


def delta_to_proto(event: DeltaEvent) -> pb.TokenDelta:
    return pb.TokenDelta(text=event.text, token_ids=event.token_ids,
                         logprobs=[_logprob_to_proto(entry) for entry in event.logprobs])


def finished_to_proto(event: FinishedEvent) -> pb.Finished:
    return pb.Finished(
        reason=_FINISH_REASONS[event.reason],
        usage=pb.Usage(prompt_tokens=event.prompt_tokens, completion_tokens=event.completion_tokens),
        timings=pb.Timings(queue_ns=event.queue_ns, time_to_first_token_ns=event.time_to_first_token_ns,
                           decode_ns=event.decode_ns),
        matched_stop=event.matched_stop)


def event_to_proto(event: StartedEvent | DeltaEvent | FinishedEvent) -> pb.GenerateResponse:
    if isinstance(event, StartedEvent):
        return pb.GenerateResponse(started=started_to_proto(event))
    if isinstance(event, DeltaEvent):
        return pb.GenerateResponse(token=delta_to_proto(event))
    return pb.GenerateResponse(finished=finished_to_proto(event))


def complete_to_proto(events: list[StartedEvent | DeltaEvent | FinishedEvent]) -> pb.CompleteResponse:
    """Fold a finished stream into the unary answer (the same events: stream == unary by construction)."""
    response = pb.CompleteResponse()
    texts: list[str] = []
    for event in events:
        if isinstance(event, StartedEvent):
            response.started.CopyFrom(started_to_proto(event))
        elif isinstance(event, DeltaEvent):
            texts.append(event.text)
            response.token_ids.extend(event.token_ids)
            response.logprobs.extend(_logprob_to_proto(entry) for entry in event.logprobs)
        else:
            response.finished.CopyFrom(finished_to_proto(event))
    response.text = "".join(texts)
    return response


def tokenize_to_proto(ids: list[int], pieces: list[str]) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(ids=ids, pieces=pieces)


_MODEL_INFO_FIELDS = ("model", "architecture", "context_length", "vocab_size", "tokenizer_kind",
                      "weight_bytes", "kv_cache_bytes", "kv_block_size", "kv_blocks_total", "kv_blocks_free",
                      "backend", "device_name", "num_layers", "hidden_size", "running_requests",
                      "waiting_requests")


# The worker's names (model_info and stats) for ModelInfo fields named differently.
_WORKER_NAMES = {"kv_cache_bytes": "kv_bytes", "running_requests": "running", "waiting_requests": "waiting"}


def model_info_to_proto(info: Mapping[str, Any]) -> pb.ModelInfo:
    """`info`: the worker's model_info merged with live stats; missing keys stay at their zero value."""
    fields = {}
    for name in _MODEL_INFO_FIELDS:
        value = info.get(name, info.get(_WORKER_NAMES.get(name, name)))
        if value is not None:
            fields[name] = value
    return pb.ModelInfo(quant_types=dict(info.get("quant_types") or {}), **fields)
