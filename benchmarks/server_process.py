"""Start `qwen-serve serve` on a free loopback port for a benchmark, wait for health SERVING, stop it.

with ServedModel(model, backend="cuda", max_batch=256, max_queue=1024, kv_cache_gb=4) as served:
    served.target        # "127.0.0.1:PORT"
The server runs in its own session (its worker child goes with it on stop); its output goes to a
log file whose tail is kept for the report when start-up fails.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self

from benchmarks.common import REPO

LISTENING = re.compile(r"listening on (\S+):(\d+)")
# `serve` settings a calling shell may have exported that would fight this run's flags or lock the
# bench client out (auth, TLS, attach, fixed ports). Other QWEN_SERVE_* (e.g. QWEN_SERVE_CUDA_FUSED)
# pass through, so the served worker runs like the in-process engine bench.
SERVE_SETTINGS = tuple(f"QWEN_SERVE_{name}" for name in (
    "HOST", "PORT", "MODEL", "BACKEND", "ATTACH", "MAX_QUEUE", "KV_CACHE_GB", "MAX_BATCH", "GRACE_PERIOD",
    "TLS_CERT", "TLS_KEY", "AUTH_TOKEN", "AUTH_HEALTH", "METRICS_PORT", "LOG_JSON", "LOG_REQUESTS"))


# Servers this process started and has not stopped yet (grpc_load's SIGTERM handler stops them).
RUNNING: set[ServedModel] = set()


class ServedModel:
    def __init__(self, model: Path, backend: str, max_batch: int, max_queue: int,
                 kv_cache_gb: float | None = None, start_timeout_s: float = 180.0) -> None:
        self.command = [sys.executable, "-m", "server.cli", "serve", "--backend", backend,
                        "--model", str(model), "--host", "127.0.0.1", "--port", "0",
                        "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--grace-period", "2"]
        if kv_cache_gb is not None:
            self.command += ["--kv-cache-gb", str(kv_cache_gb)]
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.start_s: float | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="qwen-serve-bench-", suffix=".log")[1])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_tail(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:]

    def __enter__(self) -> Self:
        env = {k: v for k, v in os.environ.items() if k not in SERVE_SETTINGS}
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO, env=env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        RUNNING.add(self)
        try:
            self.port = self._wait_for_port(started)
            wait_serving(self.target, started + self.start_timeout_s, self.process)
        except BaseException:   # SystemExit from SIGTERM included: never leave a server behind
            self.stop()
            raise
        self.start_s = time.monotonic() - started
        return self

    def _wait_for_port(self, started: float) -> int:
        while time.monotonic() < started + self.start_timeout_s:
            match = LISTENING.search(self.log_path.read_text(errors="replace"))
            if match:
                return int(match.group(2))
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"qwen-serve exited ({self.process.returncode}) before listening:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)
        raise TimeoutError(f"qwen-serve printed no port in {self.start_timeout_s:g} s:\n{self.log_tail()}")

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the server's process group (front-end and worker), SIGKILL after 8 s (run_all's
        `timeout -k 10` must not kill this process before it has stopped the server)."""
        RUNNING.discard(self)
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=8)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def wait_serving(target: str, deadline: float, process: subprocess.Popen[bytes] | None = None) -> None:
    """Poll grpc.health.v1 Check until SERVING; RuntimeError if the process dies, TimeoutError late."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"qwen-serve exited with {process.returncode}")
            time.sleep(0.2)
    raise TimeoutError(f"health of {target} not SERVING in time")
