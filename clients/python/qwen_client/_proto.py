"""Client-side conversion between the typed results and the protobuf messages."""
from __future__ import annotations

from collections.abc import Sequence

from qwen_client.types import (
    FINISH_REASONS,
    Completion,
    Finished,
    GenerateOptions,
    Started,
    TokenDelta,
    TokenLogprob,
    TopLogprob,
)
from qwen_serve.v1 import generate_pb2 as pb

Messages = Sequence[tuple[str, str]] | Sequence[dict[str, str]]


def chat_messages(messages: Messages, add_generation_prompt: bool = True) -> pb.ChatMessages:
    pairs = [(m["role"], m["content"]) if isinstance(m, dict) else (m[0], m[1]) for m in messages]
    return pb.ChatMessages(messages=[pb.ChatMessage(role=r, content=c) for r, c in pairs],
                           add_generation_prompt=add_generation_prompt)


def sampling(options: GenerateOptions) -> pb.SamplingParams:
    message = pb.SamplingParams(logit_bias=dict(options.logit_bias))
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "seed"):
        value = getattr(options, name)
        if value is not None:
            setattr(message, name, value)
    return message


def stopping(options: GenerateOptions) -> pb.StoppingParams:
    message = pb.StoppingParams(stop=list(options.stop), stop_token_ids=list(options.stop_token_ids),
                                ignore_eos=options.ignore_eos)
    if options.max_tokens is not None:
        message.max_tokens = options.max_tokens
    return message


def generate_request(prompt: str | None, messages: Messages | None, token_ids: Sequence[int] | None,
                     options: GenerateOptions, add_generation_prompt: bool = True) -> pb.GenerateRequest:
    given = sum(x is not None for x in (prompt, messages, token_ids))
    if given != 1:
        raise ValueError("give exactly one of prompt, messages or token_ids")
    request = pb.GenerateRequest(sampling=sampling(options), stopping=stopping(options),
                                 logprobs=options.logprobs, top_logprobs=options.top_logprobs,
                                 request_id=options.request_id)
    if prompt is not None:
        request.prompt = prompt
    elif messages is not None:
        request.chat.CopyFrom(chat_messages(messages, add_generation_prompt))
    else:
        request.token_ids.ids.extend(token_ids or ())
    return request


def started(message: pb.Started) -> Started:
    return Started(message.request_id, message.model, message.prompt_tokens, message.seed)


def logprobs(entries: Sequence[pb.TokenLogprob]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(e.token_id, e.logprob, tuple(TopLogprob(t.token_id, t.logprob, t.text)
                                                           for t in e.top)) for e in entries)


def delta(message: pb.TokenDelta) -> TokenDelta:
    return TokenDelta(message.text, tuple(message.token_ids), logprobs(message.logprobs))


def finished(message: pb.Finished) -> Finished:
    reason = FINISH_REASONS[message.reason] if 0 <= message.reason < len(FINISH_REASONS) else str(message.reason)
    return Finished(reason, message.usage.prompt_tokens, message.usage.completion_tokens,
                    message.timings.queue_ns, message.timings.time_to_first_token_ns,
                    message.timings.decode_ns, message.matched_stop)


def event(message: pb.GenerateResponse) -> Started | TokenDelta | Finished:
    kind = message.WhichOneof("event")
    if kind == "started":
        return started(message.started)
    if kind == "token":
        return delta(message.token)
    if kind == "finished":
        return finished(message.finished)
    raise ValueError(f"unknown event in GenerateResponse: {kind!r}")


def completion(message: pb.CompleteResponse) -> Completion:
    return Completion(started(message.started), message.text, tuple(message.token_ids),
                      logprobs(message.logprobs), finished(message.finished))
