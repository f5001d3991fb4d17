"""`qwen-serve` as a process: --help, SIGTERM drains in-flight requests, a worker that cannot start."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from qwen_client import GenerateOptions, QwenClient, QwenError, TokenDelta

from server.cli import build_parser
from tests.live_server import REPO, LiveServer

SERVE_FLAGS = ("--host", "--port", "--model", "--backend", "--attach", "--max-queue", "--kv-cache-gb",
               "--max-batch", "--max-tokens-per-step", "--grace-period", "--tls-cert", "--tls-key", "--auth-token", "--auth-health",
               "--metrics-port", "--stream-messages-per-s", "--log-json", "--log-requests")


def test_help_explains_every_flag_and_its_env_var() -> None:
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for flag in SERVE_FLAGS:
        assert flag in serve_help
        env = "QWEN_SERVE_" + flag[2:].upper().replace("-", "_")
        assert env in serve_help, f"{flag} does not name {env}"
    top = subprocess.run([sys.executable, "-m", "server.cli", "--help"], cwd=REPO, capture_output=True, check=False,
                         text=True, timeout=60)
    assert top.returncode == 0
    assert all(name in top.stdout for name in ("serve", "worker", "fetch-model", "convert"))


def test_serve_exits_1_when_the_worker_cannot_start(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but not really")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_SERVE_")}
    done = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(bad), "--backend", "cpu",
                           "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    assert "the model worker could not start" in done.stderr


def test_sigterm_finishes_in_flight_refuses_new_and_exits_0(tiny_model_path: Path) -> None:
    with LiveServer(tiny_model_path, extra_args=("--grace-period", "30")) as server:
        assert server.process is not None
        events: list = []
        started = threading.Event()

        def stream() -> None:
            with QwenClient(server.target, timeout_s=60) as client:
                for event in client.generate("Count", GenerateOptions(max_tokens=40, ignore_eos=True, seed=1)):
                    events.append(event)
                    if isinstance(event, TokenDelta):
                        started.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert started.wait(60)
        os.kill(server.process.pid, signal.SIGTERM)        # the front-end only, not its worker
        time.sleep(0.3)
        with QwenClient(server.target, timeout_s=5) as late, pytest.raises(QwenError) as refused:
            late.complete("too late", GenerateOptions(max_tokens=1))
        assert refused.value.code == "UNAVAILABLE"
        reader.join(60)
        assert server.process.wait(timeout=60) == 0
    assert events[-1].reason == "length" and events[-1].completion_tokens == 40


def test_sigterm_cancels_what_outlives_the_grace_period(tiny_model_path: Path) -> None:
    with LiveServer(tiny_model_path, extra_args=("--grace-period", "1")) as server:
        assert server.process is not None
        with QwenClient(server.target, timeout_s=60) as client:
            stream = client.generate("Count", GenerateOptions(max_tokens=2000, ignore_eos=True))
            next(stream)
            next(stream)
            os.kill(server.process.pid, signal.SIGTERM)
            began = time.monotonic()
            with pytest.raises(QwenError) as ended:
                list(stream)
            assert ended.value.code in ("CANCELLED", "UNAVAILABLE")
        assert server.process.wait(timeout=30) == 0
        assert time.monotonic() - began < 15


@pytest.mark.real_model
def test_fetch_model_prints_the_verified_default_model(real_model_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "server.cli", "fetch-model"], cwd=REPO, capture_output=True,
                          text=True, timeout=300, check=False)
    assert done.returncode == 0
    assert done.stdout.strip().splitlines()[-1] == str(real_model_path)


def test_convert_to_f16_writes_a_loadable_file_and_bad_input_is_one_line(tiny_model_path: Path,
                                                                         tmp_path: Path) -> None:
    from gpu_worker.model.gguf_loader import load_gguf

    out = tmp_path / "tiny-f16.gguf"
    done = subprocess.run([sys.executable, "-m", "server.cli", "convert", "--to", "f16", str(tiny_model_path),
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    with load_gguf(out) as model:
        assert {t.qtype.name for t in model.tensors.values() if len(t.shape) == 2} == {"F16"}
    missing = subprocess.run([sys.executable, "-m", "server.cli", "convert", "--to", "f16", str(tmp_path / "no.gguf"),
                              str(tmp_path / "x.gguf")], cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("qwen-serve convert: ") and "Traceback" not in missing.stderr


def worker_command(cli_args: list[str]) -> list[str]:
    """The command line `qwen-serve serve --model m.gguf *cli_args` would spawn its worker with."""
    from server.cli import config_from_args
    from server.worker_link import default_worker_factory

    config = config_from_args(build_parser().parse_args(["serve", "--model", "m.gguf", *cli_args]))
    client = default_worker_factory(config)
    try:
        return client.process.command()
    finally:
        client.process.cleanup()     # the temp socket dir it made


def test_no_prefix_cache_reaches_the_spawned_workers_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "--no-prefix-cache" not in worker_command([])
    assert "--no-prefix-cache" in worker_command(["--no-prefix-cache"])
    monkeypatch.setenv("QWEN_SERVE_NO_PREFIX_CACHE", "1")
    assert "--no-prefix-cache" in worker_command([])


def test_max_tokens_per_step_reaches_the_worker_and_defaults_by_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpu_worker.worker_main import DEFAULT_TOKENS_PER_STEP, tokens_per_step
    from server.cli import config_from_args

    assert "--max-tokens-per-step" not in worker_command([])     # the worker picks by backend
    command = worker_command(["--max-tokens-per-step", "512"])
    assert command[command.index("--max-tokens-per-step") + 1] == "512"
    monkeypatch.setenv("QWEN_SERVE_MAX_TOKENS_PER_STEP", "1024")
    command = worker_command([])
    assert command[command.index("--max-tokens-per-step") + 1] == "1024"
    with pytest.raises(ValueError, match="max_tokens_per_step must be >= max_batch"):
        config_from_args(build_parser().parse_args(["serve", "--max-batch", "64", "--max-tokens-per-step", "32"]))
    assert tokens_per_step(None, "cuda", 64) == DEFAULT_TOKENS_PER_STEP["cuda"] == 2048
    assert tokens_per_step(None, "cpu", 64) == DEFAULT_TOKENS_PER_STEP["cpu"] == 256
    assert tokens_per_step(None, "cuda", 4096) == 4096                 # every sequence can decode
    assert tokens_per_step(300, "cuda", 64) == 300


def test_stream_messages_per_s_reaches_the_worker_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import config_from_args
    from server.worker_link import default_worker_factory

    def pacing_rate(cli_args: list[str]) -> float:
        config = config_from_args(build_parser().parse_args(["serve", "--model", "m.gguf", *cli_args]))
        client = default_worker_factory(config)
        try:
            return client._pacing.messages_per_s
        finally:
            client.process.cleanup()

    assert pacing_rate([]) == 8000
    assert pacing_rate(["--stream-messages-per-s", "0"]) == 0          # every token at once
    monkeypatch.setenv("QWEN_SERVE_STREAM_MESSAGES_PER_S", "2500")
    assert pacing_rate([]) == 2500
    with pytest.raises(ValueError, match="stream_messages_per_s must be >= 0"):
        pacing_rate(["--stream-messages-per-s", "-1"])
