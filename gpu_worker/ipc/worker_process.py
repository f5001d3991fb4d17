"""Front-end side process handling: spawn an owned worker (`python -m gpu_worker.worker_main`) or
find an attached one, connect when it is ready, stop or kill it."""
from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from gpu_worker.ipc import channel
from gpu_worker.ipc.client_endpoint import ClientConnection

# WorkerClient keyword options forwarded to the worker's command line.
WORKER_FLAGS = {"kv_cache_gb": "--kv-cache-gb", "num_kv_blocks": "--num-kv-blocks",
                "block_size": "--block-size", "max_batch": "--max-batch",
                "max_tokens_per_step": "--max-tokens-per-step",
                "heartbeat_interval_s": "--heartbeat-interval", "log_level": "--log-level",
                "request_ring_bytes": "--request-ring-bytes", "event_ring_bytes": "--event-ring-bytes",
                "prefix_cache": "--no-prefix-cache"}   # a switch: passed only when False
REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerProcess:
    def __init__(self, model_path: str, backend: str, socket_dir: str | None, attach: bool,
                 worker_opts: dict[str, object]) -> None:
        unknown = set(worker_opts) - set(WORKER_FLAGS)
        if unknown:
            raise TypeError(f"unknown worker options {sorted(unknown)}; known: {sorted(WORKER_FLAGS)}")
        if attach and socket_dir is None:
            raise ValueError("attach=True needs the socket_dir of the running worker")
        self.model_path = model_path
        self.backend = backend
        self.owned = not attach
        self._made_dir = socket_dir is None
        self.socket_dir = Path(tempfile.mkdtemp(prefix="qwen-serve-")) if socket_dir is None \
            else channel.prepare_socket_dir(socket_dir)
        self.worker_opts = {k: v for k, v in worker_opts.items() if v is not None}
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "gpu_worker.worker_main", "--model", str(self.model_path),
               "--backend", self.backend, "--socket-dir", str(self.socket_dir),
               "--parent-pid", str(os.getpid())]
        for key, value in self.worker_opts.items():
            if key == "prefix_cache":
                cmd += [] if value else [WORKER_FLAGS[key]]
            else:
                cmd += [WORKER_FLAGS[key], str(value)]
        return cmd

    def _spawn(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(self.command(), env=env, stdin=subprocess.DEVNULL)

    async def start_and_connect(self, timeout_s: float) -> ClientConnection:
        """(Re)spawn an owned worker if it is not running, then connect once it listens."""
        loop = asyncio.get_running_loop()
        if self.owned and (self.proc is None or self.proc.poll() is not None):
            self._spawn()
        deadline = loop.time() + timeout_s
        while True:
            if self.owned and self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with status {self.proc.returncode} while starting")
            try:
                return await loop.run_in_executor(None, ClientConnection.connect, self.socket_dir, 10.0)
            except (OSError, channel.HandshakeError):       # not listening yet, busy, or refused
                if loop.time() > deadline:
                    raise TimeoutError(f"worker in {self.socket_dir} not ready after {timeout_s} s") from None
                await asyncio.sleep(0.05)

    async def stop(self, kill: bool = False, grace_s: float = 10.0) -> None:
        """Wait for an owned worker to exit (after SHUTDOWN), SIGKILL it when `kill` or past grace."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        loop = asyncio.get_running_loop()
        if kill:
            proc.send_signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(loop.run_in_executor(None, proc.wait), grace_s)
        except TimeoutError:
            proc.kill()
            await loop.run_in_executor(None, proc.wait)

    def cleanup(self) -> None:
        if self._made_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
