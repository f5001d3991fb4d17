"""Per-step host -> device inputs: checks a StepBatch, fills a pinned mirror of the forward's
int32 meta buffer and uploads it (one copy for the token arrays, one for the block tables)."""
from __future__ import annotations

import numpy as np

from gpu_worker.backends.base import StepBatch
from gpu_worker.backends.cuda.device import CudaBackendError
from gpu_worker.backends.cuda.forward import META_FIELDS, StepMeta


def check_step_batch(batch: StepBatch, vocab_size: int, num_blocks: int, block_size: int, max_tokens: int,
                     max_seqs: int, max_model_len: int, max_blocks_per_seq: int) -> None:
    """ValueError naming the field for a batch the kernels would misread."""
    batch.check(vocab_size, num_blocks, block_size)
    n, num_seqs = batch.num_tokens, batch.num_seqs
    if n > max_tokens or num_seqs > max_seqs:
        raise ValueError(f"step of {n} tokens / {num_seqs} seqs exceeds [1, {max_tokens}] / [1, {max_seqs}]")
    if batch.positions.min() < 0 or batch.positions.max() >= max_model_len:
        raise ValueError(f"positions must be in [0, {max_model_len})")
    longest = -(-int(batch.context_lens.max()) // block_size)
    if longest > max_blocks_per_seq:
        raise ValueError(f"a sequence needs {longest} KV blocks, more than max_blocks_per_seq {max_blocks_per_seq}")


class StepInputs:
    """Pinned host mirror of StepMeta; `upload` enqueues the copies on the device stream.

    The copies are asynchronous: until the stream reaches them they read the mirror, so the next
    upload into this mirror first waits for them (an event). The backend alternates two mirrors,
    but a step that samples nothing (a prompt chunk) is never waited for, so with a fast host
    several of those can be in flight at once."""

    def __init__(self, device, meta: StepMeta, max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> None:
        self.device, self.meta = device, meta
        self.max_tokens, self.max_seqs, self.max_blocks_per_seq = max_tokens, max_seqs, max_blocks_per_seq
        self.host = device.cuda.pagelocked_zeros(meta.base.shape, np.int32)
        sections = [max_tokens] * len(META_FIELDS) + [max_seqs]
        bounds = np.cumsum([0] + sections)
        self.views = {name: self.host[bounds[i]:bounds[i + 1]]
                      for i, name in enumerate((*META_FIELDS, "logit_rows"))}
        self.token_bytes = int(bounds[-1]) * 4
        self.tables = self.host[bounds[-1]:].reshape(max_seqs, max_blocks_per_seq)
        self._copied = device.cuda.Event()   # recorded after this mirror's last copies
        self._copies_pending = False

    def _wait_for_previous_copies(self) -> None:
        if self._copies_pending:
            try:
                self._copied.synchronize()
            except self.device.cuda.Error as exc:   # a fault of an earlier launch surfaces here
                raise CudaBackendError(f"CUDA error while waiting for the step input copies: {exc}") from exc
            self._copies_pending = False

    def upload(self, batch: StepBatch, pad_to: int | None, logit_rows: np.ndarray | None,
               pad_tokens_to: int | None = None) -> None:
        """pad_to: decode-graph bucket (rows past the batch get harmless inputs, no KV write).
        pad_tokens_to: an eager step's bucketed token count; the tokens past the batch are
        sequence 0's position 0 again, without a KV write (their outputs are never read)."""
        self._wait_for_previous_copies()
        n, num_seqs = batch.num_tokens, batch.num_seqs
        v = self.views
        v["input_ids"][:n] = batch.input_ids
        v["positions"][:n] = batch.positions
        v["slot_mapping"][:n] = batch.slot_mapping
        v["token_seq"][:n] = np.repeat(np.arange(num_seqs, dtype=np.int32), np.diff(batch.query_start_loc))
        rows = num_seqs
        if pad_to is not None:
            self._pad(n, pad_to)
            rows = pad_to
        if pad_tokens_to is not None:
            for name, value in (("input_ids", 0), ("positions", 0), ("slot_mapping", -1), ("token_seq", 0)):
                v[name][n:pad_tokens_to] = value
        if logit_rows is not None:
            v["logit_rows"][:len(logit_rows)] = logit_rows
        width = min(batch.block_tables.shape[1], self.max_blocks_per_seq)
        self.tables[:num_seqs, :width] = batch.block_tables[:, :width]
        self.tables[:num_seqs, width:] = 0
        np.maximum(self.tables[:num_seqs], 0, out=self.tables[:num_seqs])  # -1 padding -> block 0 (unread)
        self._copy(rows)

    def _pad(self, n: int, pad_to: int) -> None:
        v = self.views
        v["input_ids"][n:pad_to] = 0
        v["positions"][n:pad_to] = 0
        v["slot_mapping"][n:pad_to] = -1
        v["token_seq"][n:pad_to] = np.arange(n, pad_to, dtype=np.int32)
        self.tables[n:pad_to] = 0

    def upload_padding(self, bucket: int) -> None:
        """Inputs of an all-padding decode step of `bucket` rows (graph warm-up and capture)."""
        self._wait_for_previous_copies()
        self._pad(0, bucket)
        self._copy(bucket)

    def _copy(self, table_rows: int) -> None:
        cuda, stream = self.device.cuda, self.device.stream
        cuda.memcpy_htod_async(self.meta.base.ptr, self.host[:self.token_bytes // 4], stream)
        tables_bytes = table_rows * self.max_blocks_per_seq * 4
        cuda.memcpy_htod_async(self.meta.block_tables.ptr, self.tables.reshape(-1)[:tables_bytes // 4], stream)
        self._copied.record(stream)
        self._copies_pending = True
