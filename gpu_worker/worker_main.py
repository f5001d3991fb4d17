"""Worker process: load the model, create the backend, size the KV cache, warm up, then serve the
front-end over shared-memory IPC (`qwen-serve worker ...` or `python -m gpu_worker.worker_main`).
"""
from __future__ import annotations

import argparse
import collections
import gc
import logging
import os
import signal
import sys
import time
from typing import Any

from gpu_worker.backends.base import Backend
from gpu_worker.engine.engine import Engine, FinishOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.ipc.worker_endpoint import WorkerEndpoint
from gpu_worker.sampling.params import SamplingParams, StoppingParams

log = logging.getLogger("qwen_serve.worker")

WARMUP_KEY = 2**64 - 1
# Token budget of one engine step when none is given. The GPU runs a 2048-token step (a whole batch
# of prompts) in ~50 ms; with 256 the prompts of 256 new requests took 128 steps, shared with the
# running decodes (first tokens up to 2.5 s late through gRPC at 256 streams on an H200). On the CPU
# a step of 2048 prompt tokens would stall every running stream for seconds: 256 keeps it short.
DEFAULT_TOKENS_PER_STEP = {"cuda": 2048, "cpu": 256}


def run_worker(model_path: str, backend: str = "auto", socket_dir: str = "/tmp/qwen-serve",
               kv_cache_gb: float = 0.25, block_size: int = 16, max_batch: int = 64,
               max_tokens_per_step: int | None = None, num_kv_blocks: int | None = None,
               heartbeat_interval_s: float = 0.1, parent_pid: int | None = None,
               request_ring_bytes: int = 1 << 20, event_ring_bytes: int = 4 << 20,
               prefix_cache: bool = True) -> int:
    """Serve until SHUTDOWN, SIGTERM/SIGINT, or (with parent_pid) the parent's exit. Returns 0.
    max_tokens_per_step None: DEFAULT_TOKENS_PER_STEP of the backend that started."""
    from gpu_worker.backends.factory import create_backend
    from gpu_worker.model.gguf_loader import load_gguf

    t0 = time.monotonic()
    model = load_gguf(model_path)
    # The cuda backend sizes its static step buffers (and CUDA graphs) from these; cpu ignores them.
    cuda_tokens = max_tokens_per_step or DEFAULT_TOKENS_PER_STEP["cuda"]
    be = create_backend(backend, model, max_num_tokens=max(cuda_tokens, max_batch), max_num_seqs=max_batch)
    max_tokens_per_step = tokens_per_step(max_tokens_per_step, be.name, max_batch)
    if num_kv_blocks is None:
        num_kv_blocks = int(kv_cache_gb * 2**30) // be.kv_bytes_per_block(block_size)
    if num_kv_blocks < 1:
        raise ValueError(f"KV budget {kv_cache_gb} GiB holds no block of {block_size} tokens")
    engine = create_engine(model, be, num_kv_blocks, block_size, max_batch, max_tokens_per_step, prefix_cache)
    warm_up(engine)
    settle_heap()
    info = describe(model, be, model_path, num_kv_blocks, block_size)
    log.info("worker ready in %.1f s: %s on %s, %d KV blocks", time.monotonic() - t0,
             info["architecture"], info["device_name"], num_kv_blocks)
    endpoint = WorkerEndpoint(engine, socket_dir, info, request_ring_bytes, event_ring_bytes,
                              heartbeat_interval_s, parent_pid)

    def request_stop(signum: int, _frame: object) -> None:
        endpoint.stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    endpoint.serve_forever()
    be.close()
    return 0


def tokens_per_step(requested: int | None, backend_name: str, max_batch: int) -> int:
    """The engine's token budget per step: the requested one, else the backend's default (never
    below max_batch, so every running sequence can decode in one step)."""
    if requested is not None:
        return requested
    return max(DEFAULT_TOKENS_PER_STEP.get(backend_name, DEFAULT_TOKENS_PER_STEP["cpu"]), max_batch)


def create_engine(model: Any, backend: Backend, num_kv_blocks: int, block_size: int = 16,
                  max_batch: int = 64, max_tokens_per_step: int = 256, prefix_cache: bool = True) -> Engine:
    """Allocate the backend's KV cache and build the engine the worker runs (tests use it too,
    so that in-process runs match the worker's exactly)."""
    config = model.config
    backend.allocate_kv_cache(num_kv_blocks, block_size)
    return Engine(backend, num_kv_blocks, block_size, max_batch, max_tokens_per_step,
                  context_length=config.context_length, eos_token_ids=default_eos_ids(model),
                  vocab_size=config.vocab_size, prefix_caching=prefix_cache)


def warm_up(engine: Engine) -> None:
    """One greedy 1-token request through the whole path; KV must be fully free afterwards."""
    spec = RequestSpec(WARMUP_KEY, (0,), SamplingParams(temperature=0.0), StoppingParams(max_tokens=1))
    events = engine.add_request(spec)
    while engine.has_work:
        events += engine.step()
    finish = [e for e in events if isinstance(e, FinishOut)]
    if len(finish) != 1 or finish[0].reason not in ("length", "eos", "stop"):
        raise RuntimeError(f"warm-up step failed: {finish}")
    if engine.block_manager.num_used_blocks:
        raise RuntimeError("warm-up left KV blocks allocated")


def settle_heap() -> None:
    """Freeze what start-up left alive (model metadata, tokenizer tables, backend state) out of
    the cyclic GC's generations. The engine allocates a few objects per sequence per step, so
    collections run many times a second; the older generations would otherwise walk all of these
    long-lived objects again each time (~12% of an engine-only run at 256 sequences)."""
    gc.collect()
    gc.freeze()


def default_eos_ids(model: Any) -> tuple[int, ...]:
    """EOS from metadata plus <|endoftext|> when the vocabulary has it (Qwen2.5: 151645, 151643);
    used when a request names no eos_token_ids of its own."""
    tokens = model.metadata.get("tokenizer.ggml.tokens") or []
    endoftext = [i for i, t in enumerate(tokens) if t == "<|endoftext|>"]
    return tuple(sorted({int(model.config.eos_token_id), *endoftext}))


def describe(model: object, be: object, model_path: str, num_kv_blocks: int, block_size: int) -> dict[str, Any]:
    """Model info for GetModelInfo (JSON-safe)."""
    config = model.config  # type: ignore[attr-defined]
    return {
        "model_path": os.path.abspath(model_path),
        "architecture": config.architecture,
        "quant_types": quant_type_counts(model),
        "context_length": config.context_length,
        "vocab_size": config.vocab_size,
        "num_layers": config.num_layers,
        "eos_token_id": config.eos_token_id,
        "eos_token_ids": list(default_eos_ids(model)),
        "tokenizer_kind": str(model.metadata.get("tokenizer.ggml.model", "unknown")),  # type: ignore[attr-defined]
        "weight_bytes": int(be.weight_bytes),  # type: ignore[attr-defined]
        "kv_bytes": int(be.kv_bytes_per_block(block_size)) * num_kv_blocks,  # type: ignore[attr-defined]
        "kv_block_size": block_size,
        "kv_blocks_total": num_kv_blocks,
        "backend": be.name,  # type: ignore[attr-defined]
        "device_name": be.device_name,  # type: ignore[attr-defined]
    }


def quant_type_counts(model: object) -> dict[str, int]:
    """{"Q4_K": n, ...} over the file's tensors."""
    names = [t.qtype.name for t in model.tensors.values()]  # type: ignore[attr-defined]
    return dict(sorted(collections.Counter(names).items()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="qwen-serve worker", description=__doc__)
    p.add_argument("--model", required=True, help="path of the GGUF file")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--socket-dir", required=True, help="dir (0700) for the worker's Unix socket")
    p.add_argument("--kv-cache-gb", type=float, default=0.25, help="KV cache budget in GiB")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="exact block count (overrides the budget)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=64, help="sequences per step")
    p.add_argument("--max-tokens-per-step", type=int, default=None,
                   help=f"token budget per step (default by backend: {DEFAULT_TOKENS_PER_STEP})")
    p.add_argument("--heartbeat-interval", type=float, default=0.1, help="seconds")
    p.add_argument("--parent-pid", type=int, default=None, help="exit when this parent process is gone")
    p.add_argument("--request-ring-bytes", type=int, default=1 << 20, help="front-end -> worker ring")
    p.add_argument("--event-ring-bytes", type=int, default=4 << 20, help="worker -> front-end ring")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="do not reuse the KV of repeated prompt prefixes (automatic prefix caching)")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s")
    return run_worker(args.model, args.backend, args.socket_dir, args.kv_cache_gb, args.block_size,
                      args.max_batch, args.max_tokens_per_step, args.num_kv_blocks,
                      args.heartbeat_interval, args.parent_pid, args.request_ring_bytes,
                      args.event_ring_bytes, args.prefix_cache)


if __name__ == "__main__":
    sys.exit(main())
