"""BENCHMARK TOOL ONLY: the host side of a batch of decode steps, on the CPU.

    python -m benchmarks.decode_host_path [--batch 256] [--steps 100] [--repeats 5] [--profile]

On the GPU the engine overlaps decode step N + 1's host work with step N's device time, so a step
costs max(host, device). At 256 sequences the device needs ~3.4 ms (H200) and the host work grows
with the batch: on a slow host it set the step time (docs/gpu_results/real_model_h200_2026-11-29_9a4475b).
This tool measures that host work without a GPU: the real engine (overlap path: steps submitted
ahead, block tables, postprocessing) over a backend that does the CUDA backend's per-step host work
for real (check_step_batch, StepInputs.upload into pinned-memory stand-ins, pack_sampling, collect's
per-sequence outputs) and picks tokens arithmetically instead of launching anything.
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
from types import SimpleNamespace

import numpy as np

from benchmarks.engine_measures import measure_decode
from benchmarks.free_forward_worker import FreeForwardBackend
from gpu_worker.backends.base import StepBatch, StepOutput
from gpu_worker.backends.cuda.forward import META_FIELDS
from gpu_worker.backends.cuda.graphs import DEFAULT_BUCKETS
from gpu_worker.backends.cuda.sampler import pack_sampling
from gpu_worker.backends.cuda.step_inputs import StepInputs, check_step_batch
from gpu_worker.engine.engine import Engine

VOCAB = 151_936                    # Qwen2.5's
BLOCK_SIZE = 16
MAX_MODEL_LEN = 2304
MAX_TOKENS = 8192


class _NoEvent:
    def record(self, stream: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


# What StepInputs uses of pycuda: host arrays instead of pinned memory, copies that do nothing.
_HOST_CUDA = SimpleNamespace(pagelocked_zeros=np.zeros, Event=_NoEvent, Error=RuntimeError,
                             memcpy_htod_async=lambda _ptr, _host, _stream: None)


class HostPathBackend(FreeForwardBackend):
    """FreeForwardBackend with the overlap contract and the CUDA backend's per-step host work."""

    supports_overlap = True

    def __init__(self, max_seqs: int) -> None:
        super().__init__(VOCAB)
        self.max_seqs = max_seqs
        self.max_blocks_per_seq = -(-MAX_MODEL_LEN // BLOCK_SIZE)
        size = MAX_TOKENS * len(META_FIELDS) + max_seqs + max_seqs * self.max_blocks_per_seq
        meta = SimpleNamespace(base=SimpleNamespace(shape=(size,), ptr=0), block_tables=SimpleNamespace(ptr=0))
        device = SimpleNamespace(cuda=_HOST_CUDA, stream=None)
        self._mirrors = [StepInputs(device, meta, MAX_TOKENS, max_seqs, self.max_blocks_per_seq) for _ in range(2)]
        self._next_mirror = 0

    def submit(self, batch: StepBatch, previous_rows: np.ndarray | None = None) -> object:
        check_step_batch(batch, VOCAB, 1 << 30, BLOCK_SIZE, MAX_TOKENS, self.max_seqs, MAX_MODEL_LEN,
                         self.max_blocks_per_seq)
        inputs = self._mirrors[self._next_mirror]
        self._next_mirror ^= 1
        if batch.num_tokens == batch.num_seqs:   # a decode step: padded to its graph's bucket
            inputs.upload(batch, pad_to=next(b for b in DEFAULT_BUCKETS if b >= batch.num_seqs), logit_rows=None)
        else:
            inputs.upload(batch, pad_to=None, logit_rows=np.asarray(batch.query_start_loc[1:]) - 1,
                          pad_tokens_to=-(-batch.num_tokens // 32) * 32)
        sampled = [i for i, req in enumerate(batch.sample) if req is not None]
        pack_sampling(sampled, [batch.sample[i] for i in sampled], VOCAB)
        return self.step(batch), sampled, batch.num_seqs

    def collect(self, handle: object) -> StepOutput:
        output, sampled, num_seqs = handle      # built as CudaBackend.collect builds its outputs
        return StepOutput.of_sampled(num_seqs, sampled, output.token_ids[sampled], [None] * len(sampled))


def make_engine(batch: int) -> Engine:
    num_blocks = batch * (-(-MAX_MODEL_LEN // BLOCK_SIZE)) + 64
    return Engine(HostPathBackend(batch), num_blocks, BLOCK_SIZE, batch, MAX_TOKENS, context_length=32768,
                  eos_token_ids=(151645,), vocab_size=VOCAB, prefix_caching=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="decode_host_path", description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=100, help="timed decode steps per repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="then one more repeat under cProfile")
    args = p.parse_args(argv)
    engine = make_engine(args.batch)
    gc.collect()
    gc.freeze()                                  # as the worker does (worker_main.settle_heap)
    max_tokens = 2 * args.steps + 64
    times = [measure_decode(engine, VOCAB, args.batch, 128, 5, args.steps, max_tokens)["ms_per_step"]
             for _ in range(args.repeats)]
    print(f"decode batch {args.batch}: host {min(times):.3f} ms per step (median {float(np.median(times)):.3f}; "
          f"{engine.num_overlapped_steps} steps submitted ahead)", flush=True)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        measure_decode(engine, VOCAB, args.batch, 128, 5, args.steps, max_tokens)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
