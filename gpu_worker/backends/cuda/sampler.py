"""GPU sampling for one step: pack the SampleRequests, run the sampling kernels, read tokens back.

The numpy specification is gpu_worker/sampling/sampler.py; the kernels reproduce it (steps 1-3
bit-exact, the draw up to float64 summation order).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.base import SampleRequest, TokenLogprobs
from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops import sampling as sampling_ops
from gpu_worker.backends.cuda.ops.sampling import HIST_BINS, MAX_TOP_LOGPROBS, NUM_SEGMENTS, SAMPLE_ARGS_DTYPE


@dataclass(frozen=True)
class PackedSampling:
    args: np.ndarray           # [num_sampled] SAMPLE_ARGS_DTYPE
    bias_ids: np.ndarray       # [num_bias] int32, per record in request order
    bias_values: np.ndarray    # [num_bias] float32
    seen_ids: np.ndarray       # [num_seen] int32, distinct per record
    output_ids: np.ndarray     # [num_out] int32, distinct per record
    output_counts: np.ndarray  # [num_out] int32
    needs_penalties: bool
    needs_logprobs: bool


def _check_ids(name: str, ids: np.ndarray, vocab: int) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"{name} has ids outside the vocabulary [0, {vocab})")
    return ids


def pack_sampling(rows: list[int], requests: list[SampleRequest], vocab: int) -> PackedSampling:
    """One record per request; `rows[i]` is request i's row in the logits buffer.

    Per step on the host path of every decode step (256 requests at a full batch): the scalar
    fields are filled column by column, and only requests with a logit bias or penalties pay for
    per-request numpy work."""
    n = len(requests)
    args = np.zeros(n, SAMPLE_ARGS_DTYPE)
    params = [req.params for req in requests]
    columns = {
        "seed": [p.seed for p in params], "step": [req.step for req in requests], "row": list(rows),
        "top_k": [p.top_k for p in params], "top_p": [p.top_p for p in params], "min_p": [p.min_p for p in params],
        "temperature": [p.temperature for p in params],
        "repetition_penalty": [p.repetition_penalty for p in params],
        "frequency_penalty": [p.frequency_penalty for p in params],
        "presence_penalty": [p.presence_penalty for p in params],
        "num_top_logprobs": [min(p.top_logprobs, MAX_TOP_LOGPROBS) for p in params],
        "want_logprobs": [int(p.logprobs or p.top_logprobs > 0) for p in params],
    }
    if n:
        for name, values in columns.items():
            args[name] = values
    bias_ids, bias_values, seen, out_ids, out_counts = [], [], [], [], []
    counts = {"bias": np.zeros(n, np.int64), "seen": np.zeros(n, np.int64), "output": np.zeros(n, np.int64)}
    for i, (req, p) in enumerate(zip(requests, params)):
        if p.logit_bias:
            ids = _check_ids("logit_bias", np.array([b[0] for b in p.logit_bias], np.int64), vocab)
            bias_ids.append(ids)
            bias_values.append(np.array([b[1] for b in p.logit_bias], np.float32))
            counts["bias"][i] = len(ids)
        if p.repetition_penalty != 1.0:
            distinct_seen = np.unique(_check_ids("seen_token_ids", req.seen_token_ids, vocab))
            seen.append(distinct_seen)
            counts["seen"][i] = len(distinct_seen)
        if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0:
            ids, id_counts = np.unique(_check_ids("output_token_ids", req.output_token_ids, vocab), return_counts=True)
            out_ids.append(ids)
            out_counts.append(id_counts)
            counts["output"][i] = len(ids)
    for kind, count in counts.items():   # records lie back to back in request order
        args[f"{kind}_count"] = count
        args[f"{kind}_offset"] = np.cumsum(count) - count

    def flat(parts: list[np.ndarray], dtype) -> np.ndarray:
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return PackedSampling(
        args=args, bias_ids=flat(bias_ids, np.int32), bias_values=flat(bias_values, np.float32),
        seen_ids=flat(seen, np.int32), output_ids=flat(out_ids, np.int32),
        output_counts=flat(out_counts, np.int32),
        needs_penalties=any(c.any() for c in counts.values()),
        needs_logprobs=bool(args["want_logprobs"].any()) if n else False)


class GpuSampler:
    """Device buffers for sampling up to `max_sampled` rows of a logits buffer [rows, vocab]."""

    def __init__(self, device, logits: DeviceTensor, max_sampled: int) -> None:
        mem = device.memory
        self.device, self.logits = device, logits
        self.args = mem.tensor("sampling", (max_sampled,), SAMPLE_ARGS_DTYPE)
        self.tokens = mem.tensor("sampling", (max_sampled,), np.int32)
        self.logprob = mem.tensor("sampling", (max_sampled,), np.float32)
        self.top_ids = mem.tensor("sampling", (max_sampled, MAX_TOP_LOGPROBS), np.int32)
        self.top_logprobs = mem.tensor("sampling", (max_sampled, MAX_TOP_LOGPROBS), np.float32)
        self.raw_logits = mem.tensor("sampling", logits.shape, np.float32)  # pre-penalty copy
        self.seg_best = mem.tensor("sampling", (max_sampled, NUM_SEGMENTS), np.uint64)
        self.seg_mass = mem.tensor("sampling", (max_sampled, NUM_SEGMENTS), np.float64)
        self.seg_hist = mem.tensor("sampling", (max_sampled, NUM_SEGMENTS, HIST_BINS), np.int32)
        self._aux_capacity = 0
        self._aux: dict[str, DeviceTensor] = {}
        self._slots = [HostSlot(device.cuda, max_sampled) for _ in range(2)]
        self._next_slot = 0

    def _aux_tensor(self, name: str, host: np.ndarray) -> DeviceTensor:
        """Uploads a flat array into a growable buffer (grows by doubling; counted as 'sampling')."""
        need = max(len(host), 1)
        if need > self._aux_capacity:
            self._aux_capacity = max(need, 2 * self._aux_capacity, 4096)
            self._aux = {key: self.device.memory.tensor("sampling", (self._aux_capacity,), dt)
                         for key, dt in (("bias_ids", np.int32), ("bias_values", np.float32),
                                         ("seen_ids", np.int32), ("output_ids", np.int32),
                                         ("output_counts", np.int32))}
        tensor = self._aux[name].view(len(host))
        if len(host):
            self.device.cuda.memcpy_htod_async(tensor.ptr, np.ascontiguousarray(host), self.device.stream)
        return tensor

    def sample(self, packed: PackedSampling) -> tuple[np.ndarray, tuple[TokenLogprobs | None, ...]]:
        """Runs on the stream and waits; tokens [num_sampled] int32 and per-record logprobs."""
        return self.finish(self.launch(packed))

    def launch(self, packed: PackedSampling) -> PendingSample:
        """Enqueues the sampling kernels and the copies of their results into the next of two
        pinned host slots, without waiting (a step in flight may still be running before them)."""
        n = len(packed.args)
        slot = self._slots[self._next_slot]
        self._next_slot ^= 1
        if n == 0:
            return PendingSample(slot, packed)
        cuda, stream = self.device.cuda, self.device.stream
        args = self.args.view(n)
        slot.args[:n] = packed.args          # pinned: the copy does not wait for the stream
        cuda.memcpy_htod_async(args.ptr, slot.args[:n], stream)
        if packed.needs_logprobs:
            cuda.memcpy_dtod_async(self.raw_logits.ptr, self.logits.ptr, self.logits.nbytes, stream)
        if packed.needs_penalties:
            sampling_ops.launch_penalties(
                self.device, self.logits, args, self._aux_tensor("bias_ids", packed.bias_ids),
                self._aux_tensor("bias_values", packed.bias_values), self._aux_tensor("seen_ids", packed.seen_ids),
                self._aux_tensor("output_ids", packed.output_ids),
                self._aux_tensor("output_counts", packed.output_counts))
        tokens = self.tokens.view(n)
        sampling_ops.launch_draw(self.device, self.logits, args, self.seg_best.view(n, NUM_SEGMENTS),
                                 self.seg_mass.view(n, NUM_SEGMENTS), self.seg_hist.view(n, NUM_SEGMENTS, HIST_BINS),
                                 tokens)
        cuda.memcpy_dtoh_async(slot.tokens[:n], tokens.ptr, stream)
        if packed.needs_logprobs:
            logprob, top_ids, top_lp = self.logprob.view(n), self.top_ids.view(n, MAX_TOP_LOGPROBS), \
                self.top_logprobs.view(n, MAX_TOP_LOGPROBS)
            sampling_ops.launch_logprobs(self.device, self.raw_logits, args, tokens, logprob, top_ids, top_lp)
            for host, tensor in ((slot.logprob, logprob), (slot.top_ids, top_ids), (slot.top_logprobs, top_lp)):
                cuda.memcpy_dtoh_async(host[:n], tensor.ptr, stream)
        slot.done.record(stream)
        return PendingSample(slot, packed)

    def finish(self, pending: PendingSample) -> tuple[np.ndarray, tuple[TokenLogprobs | None, ...]]:
        """Waits for a launch's copies; its tokens [num_sampled] int32 and per-record logprobs."""
        packed, slot = pending.packed, pending.slot
        n = len(packed.args)
        if n == 0:
            return np.zeros(0, np.int32), ()
        slot.done.synchronize()
        tokens = slot.tokens[:n].copy()
        if not packed.needs_logprobs:
            return tokens, (None,) * n
        results: list[TokenLogprobs | None] = []
        for i, record in enumerate(packed.args):
            if not record["want_logprobs"]:
                results.append(None)
                continue
            k = int(record["num_top_logprobs"])
            top = tuple((int(slot.top_ids[i, j]), float(slot.top_logprobs[i, j])) for j in range(k))
            results.append(TokenLogprobs(token_id=int(tokens[i]), logprob=float(slot.logprob[i]), top=top))
        return tokens, tuple(results)


class HostSlot:
    """Pinned host buffers for one step's sampling inputs and results, and the event after them.
    Two alternate, so that step N + 1 can be launched while step N's results are still unread."""

    def __init__(self, cuda, max_sampled: int) -> None:
        self.args = cuda.pagelocked_empty(max_sampled * SAMPLE_ARGS_DTYPE.itemsize, np.uint8).view(SAMPLE_ARGS_DTYPE)
        self.tokens = cuda.pagelocked_empty(max_sampled, np.int32)
        self.logprob = cuda.pagelocked_empty(max_sampled, np.float32)
        self.top_ids = cuda.pagelocked_empty((max_sampled, MAX_TOP_LOGPROBS), np.int32)
        self.top_logprobs = cuda.pagelocked_empty((max_sampled, MAX_TOP_LOGPROBS), np.float32)
        self.done = cuda.Event()


@dataclass(frozen=True)
class PendingSample:
    slot: HostSlot
    packed: PackedSampling
