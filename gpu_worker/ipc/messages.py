"""Typed messages on the rings: fixed struct headers + numpy arrays, no pickling.

Request ring (front-end -> worker): SUBMIT, ABORT, STATS_REQUEST, SHUTDOWN.
Event ring (worker -> front-end): TOKENS (all new tokens of one engine step), FINISHED, STATS.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpu_worker.backends.base import TokenLogprobs
from gpu_worker.engine.engine import FinishOut, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.sampling.params import SamplingParams, StoppingParams

SUBMIT, ABORT, STATS_REQUEST, SHUTDOWN = 1, 2, 3, 4
TOKENS, FINISHED, STATS = 16, 17, 18

# key, temperature, top_p, min_p, repetition, presence, frequency, seed, top_k, max_tokens,
# n_prompt, n_bias, n_stop, n_eos, logprobs, top_logprobs, ignore_eos, pad
_SUBMIT = struct.Struct("<Q6dQiIIIIIBBBx")
_KEY = struct.Struct("<Q")
_TOKENS = struct.Struct("<II")                 # num_tokens, num_top (all entries together)
_FINISHED = struct.Struct("<QIIqqqBxH")       # key, prompt, completion, queue, ttft, decode, reason, msg_len
REASONS = ("eos", "length", "stop", "cancelled", "error")
MAX_TOP_LOGPROBS = 20
# Worst-case bytes one token adds to a TOKENS record (key, id, logprob, count, 20 alternatives).
MAX_TOKEN_RECORD_BYTES = 8 + 4 + 8 + 1 + MAX_TOP_LOGPROBS * (4 + 8)


def encode_submit(spec: RequestSpec) -> bytes:
    s, t = spec.sampling, spec.stopping
    bias_ids = np.array([i for i, _ in s.logit_bias], dtype=np.int32)
    bias_vals = np.array([v for _, v in s.logit_bias], dtype=np.float64)
    head = _SUBMIT.pack(spec.request_key, s.temperature, s.top_p, s.min_p, s.repetition_penalty,
                        s.presence_penalty, s.frequency_penalty, s.seed, s.top_k, t.max_tokens,
                        len(spec.prompt_token_ids), len(bias_ids), len(t.stop_token_ids),
                        len(t.eos_token_ids), s.logprobs, s.top_logprobs, t.ignore_eos)
    arrays = (bias_vals, np.asarray(spec.prompt_token_ids, dtype=np.int32), bias_ids,
              np.asarray(t.stop_token_ids, dtype=np.int32), np.asarray(t.eos_token_ids, dtype=np.int32))
    return head + b"".join(a.tobytes() for a in arrays)


def decode_submit(payload: bytes) -> RequestSpec:
    """Inverse of encode_submit; raises ValueError for a malformed or out-of-range message."""
    if len(payload) < _SUBMIT.size:
        raise ValueError("SUBMIT message too short")
    (key, temp, top_p, min_p, rep, pres, freq, seed, top_k, max_tokens, n_prompt, n_bias, n_stop,
     n_eos, logprobs, top_logprobs, ignore_eos) = _SUBMIT.unpack_from(payload)
    expected = _SUBMIT.size + 8 * n_bias + 4 * (n_prompt + n_bias + n_stop + n_eos)
    if len(payload) != expected:
        raise ValueError(f"SUBMIT message is {len(payload)} bytes, its counts say {expected}")
    off = _SUBMIT.size
    bias_vals = np.frombuffer(payload, dtype=np.float64, count=n_bias, offset=off)
    off += 8 * n_bias
    ints = np.frombuffer(payload, dtype=np.int32, offset=off)
    prompt, rest = ints[:n_prompt], ints[n_prompt:]
    bias_ids, stop_ids, eos_ids = rest[:n_bias], rest[n_bias:n_bias + n_stop], rest[n_bias + n_stop:]
    sampling = SamplingParams(temperature=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=rep, presence_penalty=pres, frequency_penalty=freq,
                              seed=seed, logit_bias=tuple(zip(bias_ids.tolist(), bias_vals.tolist())),
                              logprobs=bool(logprobs), top_logprobs=top_logprobs)
    stopping = StoppingParams(max_tokens=max_tokens, stop_token_ids=tuple(stop_ids.tolist()),
                              ignore_eos=bool(ignore_eos), eos_token_ids=tuple(eos_ids.tolist()))
    return RequestSpec(key, tuple(prompt.tolist()), sampling, stopping)


def encode_key(key: int) -> bytes:
    """ABORT and STATS_REQUEST payload (request key or stats nonce)."""
    return _KEY.pack(key)


def decode_key(payload: bytes) -> int:
    return int(_KEY.unpack(payload)[0])


def encode_tokens(tokens: list[TokenOut]) -> bytes:
    """[n] keys u64 | [n] token ids i32 | [n] logprob f64 (NaN: none) | [n] top counts u8 |
    [num_top] top ids i32 | [num_top] top logprobs f64."""
    n = len(tokens)
    columns = tuple(zip(*tokens)) or ((), (), ())     # TokenOut is a NamedTuple: one transpose
    key_list, id_list, logprob_list = columns
    keys = np.array(key_list, dtype=np.uint64)
    ids = np.array(id_list, dtype=np.int32)
    if logprob_list.count(None) == n:           # the common case: nobody asked for logprobs
        lps = np.full(n, math.nan)
        counts = np.zeros(n, dtype=np.uint8)
        top_ids, top_lps = np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float64)
    else:
        lps = np.array([lp.logprob if lp else math.nan for lp in logprob_list], dtype=np.float64)
        tops = [lp.top if lp else () for lp in logprob_list]
        counts = np.array([len(top) for top in tops], dtype=np.uint8)
        top_ids = np.array([i for top in tops for i, _ in top], dtype=np.int32)
        top_lps = np.array([v for top in tops for _, v in top], dtype=np.float64)
    return b"".join((_TOKENS.pack(n, len(top_ids)), keys.tobytes(), lps.tobytes(), top_lps.tobytes(),
                     ids.tobytes(), top_ids.tobytes(), counts.tobytes()))


def decode_tokens(payload: bytes) -> list[TokenOut]:
    return [TokenOut(key, token_id, logprobs) for key, token_id, logprobs in zip(*decode_token_columns(payload))]


def decode_token_columns(payload: bytes) -> tuple[list[int], list[int], list[TokenLogprobs | None]]:
    """A TOKENS record as three parallel lists (keys, token ids, logprobs or None): the front-end
    routes these straight to streams, without a TokenOut per token."""
    n, num_top = _TOKENS.unpack_from(payload)
    off = _TOKENS.size
    keys = np.frombuffer(payload, np.uint64, n, off)
    off += 8 * n
    lps = np.frombuffer(payload, np.float64, n, off)
    off += 8 * n
    top_lps = np.frombuffer(payload, np.float64, num_top, off)
    off += 8 * num_top
    ids = np.frombuffer(payload, np.int32, n, off)
    off += 4 * n
    top_ids = np.frombuffer(payload, np.int32, num_top, off)
    off += 4 * num_top
    counts = np.frombuffer(payload, np.uint8, n, off)
    id_list = ids.tolist()
    has_logprobs = ~np.isnan(lps)
    if not has_logprobs.any():                  # the common case: nobody asked for logprobs
        return keys.tolist(), id_list, [None] * n
    logprobs: list[TokenLogprobs | None] = [None] * n
    top_id_list, top_lp_list, lp_list, count_list = top_ids.tolist(), top_lps.tolist(), lps.tolist(), counts.tolist()
    top_at = 0
    for i in np.flatnonzero(has_logprobs).tolist():
        c = count_list[i]
        top = tuple(zip(top_id_list[top_at:top_at + c], top_lp_list[top_at:top_at + c]))
        logprobs[i] = TokenLogprobs(id_list[i], lp_list[i], top)
        top_at += c
    return keys.tolist(), id_list, logprobs


def encode_finished(ev: FinishOut) -> bytes:
    msg = ev.message.encode("utf-8")[:1024]      # keeps a record far below any ring size
    return _FINISHED.pack(ev.request_key, ev.prompt_tokens, ev.completion_tokens, ev.queue_ns,
                          ev.ttft_ns, ev.decode_ns, REASONS.index(ev.reason), len(msg)) + msg


def decode_finished(payload: bytes) -> FinishOut:
    key, prompt, completion, queue, ttft, decode, reason, msg_len = _FINISHED.unpack_from(payload)
    msg = payload[_FINISHED.size:_FINISHED.size + msg_len].decode("utf-8", "replace")
    return FinishOut(key, REASONS[reason], prompt, completion, queue, ttft, decode, msg)


def encode_stats(stats: dict[str, Any]) -> bytes:
    return json.dumps(stats).encode()


def decode_stats(payload: bytes) -> dict[str, Any]:
    stats: dict[str, Any] = json.loads(payload)
    return stats


@dataclass(frozen=True)
class StatsReply:
    nonce: int     # 0 for the periodic heartbeat stats
    stats: dict[str, Any]
