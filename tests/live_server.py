"""A real `qwen-serve serve` process for tests of clients in other languages (not a test module).

with LiveServer(model_path) as server:      # cpu backend, worker child process, ports picked free
    server.target        # "127.0.0.1:PORT" for gRPC
    server.metrics_url   # "http://127.0.0.1:PORT/metrics"
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.server_process import wait_serving

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
LISTENING = re.compile(r"listening on (\S+):(\d+)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class LiveServer:
    def __init__(self, model_path: Path, start_timeout_s: float = 120.0, extra_args: tuple[str, ...] = ()):
        self.model_path = Path(model_path)
        self.start_timeout_s = start_timeout_s
        self.extra_args = extra_args
        self.metrics_port = free_port()
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        # Output goes to a file, not a pipe: a pipe nobody drains would block the server once full.
        self.log_file = tempfile.NamedTemporaryFile(prefix="qwen-serve-", suffix=".log", delete=False)

    @property
    def output(self) -> str:
        return Path(self.log_file.name).read_text(errors="replace")

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def __enter__(self) -> LiveServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_SERVE_")}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--backend",
                "cpu",
                "--model",
                str(self.model_path),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--metrics-port",
                str(self.metrics_port),
                *self.extra_args,
            ],
            cwd=REPO,
            env=env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            self.port = self._read_port()
            self._wait_serving()
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def _read_port(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            match = LISTENING.search(self.output)
            if match:
                return int(match.group(2))
            if self.process.poll() is not None:
                raise RuntimeError("qwen-serve exited before listening:\n" + self.output)
            time.sleep(0.05)
        raise TimeoutError("qwen-serve did not print its port:\n" + self.output)

    def _wait_serving(self) -> None:
        try:
            wait_serving(self.target, time.monotonic() + self.start_timeout_s, self.process)
        except (RuntimeError, TimeoutError) as error:
            raise type(error)(f"{error}:\n{self.output}") from None

    def __exit__(self, *exc: object) -> None:
        self.log_file.close()
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the worker child goes too
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        Path(self.log_file.name).unlink(missing_ok=True)


def entrypoint_script(dest_dir: Path) -> Path:
    """The Dockerfile's `qwen-serve-entrypoint` heredoc, written to dest_dir."""
    match = re.search(
        r"<<'EOF' /usr/local/bin/qwen-serve-entrypoint\n(.*?)\nEOF\n", DOCKERFILE.read_text(), re.S
    )
    if match is None:
        raise ValueError("entrypoint heredoc not found in the Dockerfile")
    script = Path(dest_dir) / "qwen-serve-entrypoint"
    script.write_text(match[1] + "\n")
    return script


def entrypoint_env(**settings: str) -> dict[str, str]:
    """This environment without QWEN_SERVE_* (the host's must not leak in), the venv first on PATH (as
    /opt/venv/bin is in the image), plus `settings`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_SERVE_")}
    path = f"{Path(sys.executable).parent}:{base.get('PATH', '/usr/bin:/bin')}"
    return {**base, "PATH": path, "PYTHONPATH": str(REPO), **settings}
