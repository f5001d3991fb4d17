"""The serving path alone: real front-end + IPC + worker loop, a model forward that costs nothing.

    python -m benchmarks.serving_path --json /tmp/serving_path.json [--concurrency 1,16,64,256]

Starts `benchmarks.free_forward_worker` (real engine and IPC, free forward; a benchmark tool that
`serve` cannot reach) on a tiny synthetic GGUF carrying the real tokenizer when the default model
is present (so detokenizing costs what it costs in production), attaches `qwen-serve serve` to it,
and runs grpc_load's levels against it: the rates measured are the most the serving path can pass.
Any grpc_load flag after `--` is passed on (e.g. `-- --max-tokens 256 --rounds 2`). With --json,
the same requests then run through the same engine in-process ("engine alone": the ceiling for gRPC).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from benchmarks import grpc_load
from benchmarks.common import REPO, parse_int_list
from benchmarks.server_process import ServedModel


def engine_alone(model: Path, levels: list[int], prompt_len: int, max_tokens: int,
                 step_ms: float) -> dict[str, dict[str, float]]:
    """N requests added at once to an in-process engine on the free forward: aggregate output tok/s
    from the first add to the last finish (grpc_load's definition, minus gRPC and IPC)."""
    from benchmarks.engine_measures import random_prompts
    from benchmarks.free_forward_worker import FreeForwardBackend
    from gpu_worker.engine.engine import TokenOut
    from gpu_worker.engine.sequence import RequestSpec
    from gpu_worker.model.gguf_loader import load_gguf
    from gpu_worker.sampling.params import SamplingParams, StoppingParams
    from gpu_worker.worker_main import create_engine, settle_heap

    loaded = load_gguf(model)
    settle_heap()               # as the worker does after start-up
    results = {}
    for n in levels:
        engine = create_engine(loaded, FreeForwardBackend(loaded.config.vocab_size, step_ms / 1000),
                               32_768, 16, max(levels), 2048)
        stopping = StoppingParams(max_tokens=max_tokens, ignore_eos=True)
        started, tokens = time.monotonic(), 0
        for key, prompt in enumerate(random_prompts(n, prompt_len, loaded.config.vocab_size, seed=n), 1):
            engine.add_request(RequestSpec(key, tuple(prompt), SamplingParams(temperature=0.0), stopping))
        while engine.has_work:
            tokens += sum(isinstance(event, TokenOut) for event in engine.step())
        wall = time.monotonic() - started
        results[f"concurrency_{n}"] = {"output_tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall}
        print(f"    engine alone, {n} requests: {tokens / wall:,.0f} tok/s", flush=True)
    return results


def tiny_model(directory: Path) -> Path:
    from gpu_worker.model.fetch import default_model_path
    from gpu_worker.model.synthetic import write_synthetic_gguf

    real = default_model_path()
    path = directory / "tiny-qwen2-q8_0.gguf"
    write_synthetic_gguf(path, seed=0, tokenizer_from=real if real.is_file() else None)
    return path


class FreeForwardWorker:
    """The benchmark worker in its own session, stopped with SIGTERM (SIGKILL if it lingers)."""

    def __init__(self, model: Path, socket_dir: Path, step_ms: float, log_path: Path) -> None:
        self.command = [sys.executable, "-m", "benchmarks.free_forward_worker", "--model", str(model),
                        "--socket-dir", str(socket_dir), "--step-ms", str(step_ms)]
        self.socket_dir, self.log_path = socket_dir, log_path
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        from gpu_worker.ipc.worker_endpoint import wait_for_socket

        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        try:
            wait_for_socket(self.socket_dir, timeout_s=120)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed_on = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="serving_path", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,16,64,256")
    p.add_argument("--step-ms", type=float, default=0.0, help="worker sleep per step (imitates device time)")
    p.add_argument("--json", type=Path)
    p.add_argument("--pids-file", type=Path, help="write 'frontend=PID worker=PID' here once serving "
                                                  "(for attaching a profiler)")
    return p.parse_args(own), passed_on


def main(argv: list[str] | None = None) -> int:
    args, passed_on = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="qwen-serving-path-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        socket_dir = work / "sock"
        socket_dir.mkdir(mode=0o700)
        started = time.monotonic()
        with FreeForwardWorker(model, socket_dir, args.step_ms, work / "worker.log") as worker:
            levels = parse_int_list(args.concurrency)
            served = ServedModel(model, "cpu", max_batch=max(levels), max_queue=max(64, 2 * max(levels)))
            served.command += ["--attach", str(socket_dir)]
            with served:
                print(f"serving path ready in {time.monotonic() - started:.1f} s at {served.target}", flush=True)
                if args.pids_file:
                    assert served.process is not None and worker.process is not None
                    args.pids_file.write_text(f"frontend={served.process.pid} worker={worker.process.pid}\n")
                load_argv = ["--target", served.target, "--concurrency", args.concurrency, *passed_on]
                if args.json:
                    load_argv += ["--json", str(args.json)]
                status = grpc_load.main(load_argv)
        if args.json:      # the ceiling, measured after the servers are gone (no CPU shared with them)
            load_args = grpc_load.parse_args(load_argv)
            ceiling = engine_alone(model, levels, load_args.prompt_len, load_args.max_tokens, args.step_ms)
            data = json.loads(args.json.read_text())
            data["serving_path"] = {"step_ms": args.step_ms, "engine_alone": ceiling}
            args.json.write_text(json.dumps(data, indent=2))
        return status


if __name__ == "__main__":
    sys.exit(main())
