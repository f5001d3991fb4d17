"""BENCHMARK TOOL ONLY: a worker process whose model forward costs (almost) nothing.

    python -m benchmarks.free_forward_worker --model TINY.gguf --socket-dir DIR [--step-ms 0]

It runs the real engine (scheduler, KV block manager), the real IPC endpoint and the real worker
loop, but `FreeForwardBackend.step` only picks token ids arithmetically: what `serving_path`
measures is then the serving path itself (front-end + IPC + worker loop), not the model.
`--step-ms` adds a sleep per step (the GIL is released, like a GPU wait) to imitate a device.

Nothing in `qwen-serve serve` can reach this backend: the front-end attaches to this process with
`--attach DIR`; the model file only supplies the tokenizer and shapes.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time

import numpy as np

from gpu_worker.backends.base import Backend, StepBatch, StepOutput, TokenLogprobs
from gpu_worker.ipc.worker_endpoint import WorkerEndpoint
from gpu_worker.worker_main import create_engine, describe, settle_heap, warm_up

# Ids below this are ordinary text tokens in Qwen2.5's vocabulary (special tokens start at 151643).
TEXT_TOKEN_LIMIT = 151_000


class FreeForwardBackend(Backend):
    """No weights and no KV memory: token i+1 is a fixed function of token i and its position."""

    name = "free-forward (benchmark)"
    device_name = "none: benchmarks.free_forward_worker"
    weight_bytes = 0

    def __init__(self, vocab_size: int, step_s: float = 0.0) -> None:
        self.num_text_ids = min(vocab_size, TEXT_TOKEN_LIMIT)
        self.step_s = step_s

    def kv_bytes_per_block(self, block_size: int) -> int:
        return block_size          # nominal: sizes nothing

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        pass

    def step(self, batch: StepBatch) -> StepOutput:
        if self.step_s:
            time.sleep(self.step_s)
        last = batch.query_start_loc[1:] - 1
        ids = (batch.input_ids[last].astype(np.int64) * 7919 + batch.positions[last] * 104_729 + 11)
        token_ids = (ids % self.num_text_ids).astype(np.int32)
        logprobs: list[TokenLogprobs | None] = []
        for i, request in enumerate(batch.sample):
            if request is None:
                token_ids[i] = -1
                logprobs.append(None)
            elif request.params.logprobs:
                token = int(token_ids[i])
                top = tuple((int((token + k) % self.num_text_ids), -0.5 - k)
                            for k in range(request.params.top_logprobs))
                logprobs.append(TokenLogprobs(token, -0.5, top))
            else:
                logprobs.append(None)
        return StepOutput(token_ids=token_ids, logprobs=tuple(logprobs))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="free_forward_worker", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="GGUF (tokenizer + shapes only; a tiny synthetic one)")
    p.add_argument("--socket-dir", required=True)
    p.add_argument("--max-batch", type=int, default=256)
    p.add_argument("--max-tokens-per-step", type=int, default=2048)
    p.add_argument("--num-kv-blocks", type=int, default=32_768)
    p.add_argument("--step-ms", type=float, default=0.0, help="sleep per step (imitates device time)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from gpu_worker.model.gguf_loader import load_gguf

    args = parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr,
                        format="%(asctime)s free-forward-worker[%(process)d] %(levelname)s %(message)s")
    model = load_gguf(args.model)
    backend = FreeForwardBackend(model.config.vocab_size, args.step_ms / 1000)
    engine = create_engine(model, backend, args.num_kv_blocks, 16, args.max_batch, args.max_tokens_per_step)
    warm_up(engine)
    settle_heap()
    info = describe(model, backend, args.model, args.num_kv_blocks, 16)
    endpoint = WorkerEndpoint(engine, args.socket_dir, info)

    def request_stop(_signum: int, _frame: object) -> None:
        endpoint.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    endpoint.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
