"""The `cuda` backend: weights (file formats) and the paged fp16 KV cache on one GPU, the project's
own prebuilt kernels through PyCUDA, decode steps replayed from CUDA graphs, sampling on the GPU.

Batch invariance: every kernel reduces in an order fixed per row (see forward.py and cuda/), so a
sequence's logits and tokens do not depend on the batch or on how its prompt was chunked.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from gpu_worker.backends.base import Backend, StepBatch, StepOutput
from gpu_worker.backends.cuda.device import CudaBackendError, CudaDevice, CudaOutOfMemoryError, DeviceTensor
from gpu_worker.backends.cuda.forward import LINEAR_KERNELS, Qwen2Forward
from gpu_worker.backends.cuda.graphs import DEFAULT_BUCKETS, DecodeGraphs, graphs_available
from gpu_worker.backends.cuda.sampler import GpuSampler, PendingSample, pack_sampling
from gpu_worker.backends.cuda.step_inputs import StepInputs, check_step_batch
from gpu_worker.backends.cuda.weights import can_interleave_gate_up, upload_weights

FUSED_ENV = "QWEN_SERVE_CUDA_FUSED"
# Decode graphs of up to this many tokens launch the kernels written for it with programmatic
# dependent launch, where launcher.pdl_enabled allows: real model on an H200, graphs of 1 / 2 / 4 / 8
# tokens 883 / 969 / 1,128 / 1,256 us without, 855 / 945 / 1,090 / 1,207 with. Larger steps (where
# PDL on every launch had coincided with slower 256-stream gRPC runs), prompt chunks and eager
# launches go without it.
PDL_MAX_TOKENS = 8
LINEAR_ENV = "QWEN_SERVE_CUDA_LINEAR"
# Eager steps (prefill, mixed) run on token counts rounded up to a multiple of EAGER_TOKEN_BUCKET and
# logits rows rounded up to one of EAGER_LOGITS_BUCKET: up to 31 padding tokens of work buys a shape
# seen before, whose recorded launches replay. A shape never seen pays its tile plans and its
# recording: prompts of new lengths took a median 19.9 ms unbucketed, 4.4 ms bucketed (H200, 33..511 tokens).
EAGER_TOKEN_BUCKET, EAGER_LOGITS_BUCKET = 32, 8


class PendingStep(NamedTuple):
    """A submitted step: its sampling in flight, and which sequences it samples."""

    sample: PendingSample
    sampled: list[int]       # indices of the sequences with a SampleRequest
    num_seqs: int


class CudaBackend(Backend):
    name = "cuda"
    supports_overlap = True   # submit() enqueues without waiting; see Backend.submit

    def __init__(self, model, *, device_index: int = 0, max_num_tokens: int = 2048, max_num_seqs: int = 256,
                 max_model_len: int | None = None, use_graphs: bool = True, fatbin_path: str | None = None,
                 progress: Callable[[int, int], None] | None = None, device: CudaDevice | None = None,
                 fused: bool | None = None, linear: str | None = None) -> None:
        if max_num_tokens < max_num_seqs or max_num_seqs <= 0:
            raise ValueError(f"need 0 < max_num_seqs ({max_num_seqs}) <= max_num_tokens ({max_num_tokens})")
        self.config = model.config
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.max_model_len = min(max_model_len or self.config.context_length, self.config.context_length)
        # Linear kernels (forward.py): "mma" (tensor cores, the default) or "fp32" (mat-vec FMAs),
        # linear= or QWEN_SERVE_CUDA_LINEAR. The fused forward (fp32 only, fewer launches) is opt-in:
        # fused=True or QWEN_SERVE_CUDA_FUSED=1; it needs gate and up of one type per layer.
        want_fused = os.environ.get(FUSED_ENV, "0") == "1" if fused is None else fused
        self.linear = linear or os.environ.get(LINEAR_ENV) or ("fp32" if want_fused else "mma")
        if self.linear not in LINEAR_KERNELS:
            raise ValueError(f"{LINEAR_ENV} / linear must be one of {LINEAR_KERNELS}, got {self.linear!r}")
        # A shared device (tests) lends its context; the backend still counts its own memory.
        self.device = device.child() if device is not None else CudaDevice(device_index, fatbin_path)
        self.device_name = self.device.name
        self.fused = bool(want_fused and self.linear == "fp32" and can_interleave_gate_up(model))
        # Gate and up as one row-interleaved matrix: the fused mat-vec's and linear_mma's SwiGLU epilogue.
        interleave = can_interleave_gate_up(model) and (self.fused or self.linear == "mma")
        try:
            self.weights = upload_weights(self.device, model, progress, interleave_gate_up=interleave)
        except Exception:
            self.device.close()
            raise
        self.weight_bytes = self.weights.nbytes
        self.use_graphs = use_graphs and graphs_available()
        self.forward: Qwen2Forward | None = None
        self.graphs: DecodeGraphs | None = None
        self.kv_bytes = 0

    @property
    def memory_bytes(self) -> dict[str, int]:
        """Device bytes per purpose: weights, kv, activations, logits, sampling."""
        return dict(self.device.memory.bytes_by_purpose)

    def kv_bytes_per_block(self, block_size: int) -> int:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        return block_size * self.config.kv_bytes_per_token

    def num_kv_blocks_for_budget(self, block_size: int, kv_cache_gb: float | None = None,
                                 vram_fraction: float = 0.9, reserve_bytes: int = 1 << 30) -> int:
        """Blocks that fit in `kv_cache_gb` GiB, or in vram_fraction of the free VRAM minus a reserve
        for activations and logits (call before allocate_kv_cache)."""
        if kv_cache_gb is not None:
            if kv_cache_gb <= 0:
                raise ValueError(f"kv_cache_gb must be > 0, got {kv_cache_gb}")
            budget = int(kv_cache_gb * (1 << 30))
        else:
            if not 0 < vram_fraction <= 1:
                raise ValueError(f"vram_fraction must be in (0, 1], got {vram_fraction}")
            budget = int(self.device.memory.free_bytes() * vram_fraction) - reserve_bytes
        blocks = budget // self.kv_bytes_per_block(block_size)
        if blocks <= 0:
            raise CudaOutOfMemoryError("the KV cache", self.kv_bytes_per_block(block_size),
                                       self.device.memory.free_bytes())
        return int(blocks)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        """KV per layer [num_blocks * block_size, num_kv_heads, head_dim] fp16, K and V; then the
        step buffers and the decode graphs (which bake in every pointer)."""
        if self.forward is not None:
            raise CudaBackendError("allocate_kv_cache may be called once per CudaBackend")
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be > 0, got {num_blocks}")
        cfg, mem = self.config, self.device.memory
        num_slots = num_blocks * block_size
        total = num_blocks * self.kv_bytes_per_block(block_size)
        base = mem.allocate("kv", total)
        layer_bytes = num_slots * cfg.num_kv_heads * cfg.head_dim * 2
        shape, fp16 = (num_slots, cfg.num_kv_heads, cfg.head_dim), np.dtype(np.float16)
        kv = [(DeviceTensor(base + 2 * i * layer_bytes, shape, fp16),         # K of layer i
               DeviceTensor(base + (2 * i + 1) * layer_bytes, shape, fp16))   # V of layer i
              for i in range(cfg.num_layers)]
        self.kv_bytes, self.num_blocks, self.block_size = total, num_blocks, block_size
        max_blocks_per_seq = -(-self.max_model_len // block_size)
        self.forward = Qwen2Forward(self.device, cfg, self.weights, self.max_num_tokens, self.max_num_seqs,
                                    max_blocks_per_seq, self.max_model_len, fused=self.fused,
                                    linear=self.linear, use_graphs=self.use_graphs)
        self.forward.set_kv_cache(kv, block_size)
        # Two pinned input mirrors, alternating per step: step N + 1's inputs are written while step
        # N's copy may still wait in the stream.
        self._input_mirrors = [StepInputs(self.device, self.forward.meta, self.max_num_tokens, self.max_num_seqs,
                                          max_blocks_per_seq) for _ in range(2)]
        self.inputs = self._input_mirrors[0]
        self.sampler = GpuSampler(self.device, self.forward.acts.logits, self.max_num_seqs)
        if self.use_graphs:
            self._capture_decode_graphs()

    def _capture_decode_graphs(self) -> None:
        buckets = tuple(b for b in DEFAULT_BUCKETS if b <= self.max_num_seqs)
        self.graphs = DecodeGraphs(self.device.stream, buckets)
        record = getattr(self.device.module, "recording", None)
        for bucket in reversed(buckets):
            self.inputs.upload_padding(bucket)   # valid inputs for a warm-up run of this shape
            launches = functools.partial(self.forward.enqueue, bucket, bucket, all_rows=True, decode=True)
            if record is None:
                launches()
            else:   # the capture replays the warm-up's recorded launches: no second pass of Python
                pdl = self.device.module.programmatic_launches(bucket <= PDL_MAX_TOKENS)
                with record() as recorded, pdl:
                    launches()
                launches = recorded.replay
            self.device.synchronize()
            self.graphs.capture(bucket, lambda _bucket, launches=launches: launches())
        self.device.synchronize()

    def step(self, batch: StepBatch) -> StepOutput:
        return self.collect(self.submit(batch))

    def submit(self, batch: StepBatch, previous_rows: np.ndarray | None = None) -> PendingStep:
        """Enqueues the step (input copies, forward or decode graph, sampling, result copies)
        without waiting for the device; collect() waits. See Backend.submit."""
        if self.forward is None:
            raise CudaBackendError("allocate_kv_cache() must be called before the first step")
        check_step_batch(batch, self.config.vocab_size, self.num_blocks, self.block_size,
                         self.max_num_tokens, self.max_num_seqs, self.max_model_len,
                         self.inputs.max_blocks_per_seq)
        is_decode = batch.num_tokens == batch.num_seqs
        if previous_rows is not None and (not is_decode or len(previous_rows) != batch.num_seqs):
            raise ValueError("previous_rows needs a decode step (one token per sequence) and one row each")
        self.inputs = self._input_mirrors[1] if self.inputs is self._input_mirrors[0] else self._input_mirrors[0]
        bucket = self.graphs.bucket_for(batch.num_seqs) if (self.graphs and is_decode) else None
        if bucket is not None:
            self.inputs.upload(batch, pad_to=bucket, logit_rows=None)
            if previous_rows is not None:
                self._take_previous_tokens(previous_rows)
            self.graphs.replay(bucket)
            rows = list(range(batch.num_seqs))
        else:
            rows = self._eager_step(batch, previous_rows=previous_rows)
        sampled = [i for i, req in enumerate(batch.sample) if req is not None]
        packed = pack_sampling([rows[i] for i in sampled], [batch.sample[i] for i in sampled],
                               self.config.vocab_size)
        return PendingStep(self.sampler.launch(packed), sampled, batch.num_seqs)

    def collect(self, handle: object) -> StepOutput:
        assert isinstance(handle, PendingStep)
        tokens, logprobs = self.sampler.finish(handle.sample)
        return StepOutput.of_sampled(handle.num_seqs, handle.sampled, tokens, logprobs)

    def _take_previous_tokens(self, previous_rows: np.ndarray) -> None:
        """Input id i of this decode step = the token the previous step sampled in row
        previous_rows[i] (still on the device: sampler.tokens), copied over the uploaded
        placeholders: one device copy per run of consecutive rows (one run unless sequences
        finished in between)."""
        rows = np.asarray(previous_rows, np.int64)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        for start, end in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]])):
            self.device.cuda.memcpy_dtod_async(self.forward.meta.input_ids.ptr + 4 * int(start),
                                               self.sampler.tokens.ptr + 4 * int(rows[start]),
                                               4 * int(end - start), self.device.stream)

    def _eager_step(self, batch: StepBatch, logit_rows: np.ndarray | None = None,
                    previous_rows: np.ndarray | None = None) -> list[int]:
        """Runs without a graph; returns each sequence's logits row (valid where sampled)."""
        if logit_rows is None:
            logit_rows = np.asarray(batch.query_start_loc[1:]) - 1   # last token of each sequence
        logit_rows = np.asarray(logit_rows, np.int32)
        if not (0 < len(logit_rows) <= self.max_num_seqs) or logit_rows.min() < 0 \
                or logit_rows.max() >= batch.num_tokens:
            raise ValueError(f"logit_rows must be 1..{self.max_num_seqs} token indices of the batch")
        # Shapes rounded up to buckets, so that they repeat and their recorded launches replay
        # (forward.py): padding tokens write no KV, padding logits rows repeat the last one.
        num_tokens = min(-(-batch.num_tokens // EAGER_TOKEN_BUCKET) * EAGER_TOKEN_BUCKET, self.max_num_tokens)
        num_logits = min(-(-len(logit_rows) // EAGER_LOGITS_BUCKET) * EAGER_LOGITS_BUCKET, self.max_num_seqs)
        padded_rows = np.concatenate([logit_rows, np.full(num_logits - len(logit_rows), logit_rows[-1], np.int32)])
        self.inputs.upload(batch, pad_to=None, logit_rows=padded_rows, pad_tokens_to=num_tokens)
        if previous_rows is not None:
            self._take_previous_tokens(previous_rows)
        # One token per sequence: a decode step (or a 1-token final prompt chunk, the same thing)
        self.forward.run(num_tokens, num_logits, all_rows=False, decode=batch.num_tokens == batch.num_seqs)
        return list(range(batch.num_seqs))

    def logits(self, batch: StepBatch, logit_rows: np.ndarray | None = None) -> np.ndarray:
        """Diagnostics and tests: an eager forward (writing KV); logits # [len(logit_rows), vocab] f32
        of the given token indices (default: the last token of each sequence)."""
        if self.forward is None:
            raise CudaBackendError("allocate_kv_cache() must be called before the first step")
        check_step_batch(batch, self.config.vocab_size, self.num_blocks, self.block_size,
                         self.max_num_tokens, self.max_num_seqs, self.max_model_len,
                         self.inputs.max_blocks_per_seq)
        self._eager_step(batch, logit_rows)
        num_rows = batch.num_seqs if logit_rows is None else len(logit_rows)
        return self.last_logits(num_rows)

    def last_logits(self, num_rows: int) -> np.ndarray:
        """The logits buffer's first rows after the last step # [num_rows, vocab] f32 (row i =
        sequence i for a step that ran through step())."""
        out = np.empty((num_rows, self.config.vocab_size), np.float32)
        self.device.cuda.memcpy_dtoh_async(out, self.forward.acts.logits.ptr, self.device.stream)
        self.device.synchronize()
        return out

    def close(self) -> None:
        # A step the engine submitted ahead may still run: let it finish before its graph, device
        # buffers and pinned host buffers go (a faulted device has nothing left to finish).
        try:
            self.device.synchronize()
        except CudaBackendError:
            pass
        if self.graphs is not None:
            self.graphs.close()
            self.graphs = None
        if self.forward is not None:
            self.forward.drop_recordings()
        self.device.close()
