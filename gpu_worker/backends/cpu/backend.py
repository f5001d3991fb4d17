"""The `cpu` backend: the numpy reference model over a paged fp16 KV cache, plus the numpy sampler.

Batch-invariant by construction (see gpu_worker/model/qwen2_reference.py): a sequence's tokens do
not depend on what else runs in the same step or on how its prompt was chunked.
"""
from __future__ import annotations

import os

import numpy as np

from gpu_worker.backends.base import Backend, StepBatch, StepOutput, TokenLogprobs
from gpu_worker.model.gguf_loader import GGUFModel
from gpu_worker.model.qwen2_reference import PagedKVCache, Qwen2Weights, forward, load_weights
from gpu_worker.sampling.sampler import sample


class CpuBackend(Backend):
    """Weights dequantized once to float32 (~2 GB for Qwen2.5-0.5B); KV in fp16 like the cuda backend."""

    name = "cpu"

    def __init__(self, model: GGUFModel, weights: Qwen2Weights | None = None) -> None:
        self.config = model.config
        self.weights = weights if weights is not None else load_weights(model)
        self.device_name = f"numpy ({os.cpu_count()} CPU cores)"
        self.weight_bytes = self.weights.nbytes
        self.kv: PagedKVCache | None = None

    def kv_bytes_per_block(self, block_size: int) -> int:
        if block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {block_size}")
        return block_size * self.config.kv_bytes_per_token

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.kv = None   # free the old cache before allocating the new one
        self.kv = PagedKVCache(self.config, num_blocks, block_size)

    def logits(self, batch: StepBatch, logit_rows: np.ndarray) -> np.ndarray:
        """Run the forward (writing KV) and return # [len(logit_rows), vocab] float32 logits.

        logit_rows index batch.input_ids; step() asks for the last token of each sampled sequence.
        """
        if self.kv is None:
            raise RuntimeError("allocate_kv_cache() must be called before the first step")
        check_batch(batch, self.kv, self.config.vocab_size)
        return forward(self.weights, self.kv, batch, logit_rows)

    def step(self, batch: StepBatch) -> StepOutput:
        return self.step_with_logits(batch)[0]

    def step_with_logits(self, batch: StepBatch) -> tuple[StepOutput, np.ndarray]:
        """step(), also returning the raw logits of the sampled sequences, in sequence order
        # [num_sampled, vocab] (tests and tools compare them bitwise)."""
        sampled = [i for i, req in enumerate(batch.sample) if req is not None]
        last_rows = batch.query_start_loc[1:] - 1                          # [num_seqs]
        logits = self.logits(batch, last_rows[sampled])                    # [len(sampled), vocab]
        token_ids = np.full(batch.num_seqs, -1, np.int32)
        logprobs: list[TokenLogprobs | None] = [None] * batch.num_seqs
        for row, seq in enumerate(sampled):
            request = batch.sample[seq]
            if request is not None:      # always true (`sampled`); narrows the type
                token_ids[seq], logprobs[seq] = sample(logits[row], request)
        return StepOutput(token_ids=token_ids, logprobs=tuple(logprobs)), logits

    def close(self) -> None:
        self.kv = None


def check_batch(batch: StepBatch, kv: PagedKVCache, vocab_size: int) -> None:
    """ValueError for a batch the forward would misread (wrong lengths, ids or slots out of range)."""
    batch.check(vocab_size, kv.num_blocks, kv.block_size)
