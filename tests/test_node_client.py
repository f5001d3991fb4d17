"""clients/node against a live `qwen-serve serve --backend cpu` on the tiny synthetic model.

The Node client talks gRPC to the server straight from the proto (no Python in between); Python here only
starts the server and asks it the same question through its own stubs, to compare the answers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import LiveServer

REPO = Path(__file__).resolve().parents[1]
NODE_DIR = REPO / "clients" / "node"
CLI = NODE_DIR / "bin" / "qwen-node-client.js"
PROMPT = "The capital of France is"
MAX_TOKENS = 12
TOKEN = "node-test-token"  # the server requires it: the clients must send it as bearer metadata

pb2 = pytest.importorskip("qwen_serve.v1.generate_pb2", reason="Python stubs missing: run `make stubs`")
pb2_grpc = pytest.importorskip(
    "qwen_serve.v1.generate_pb2_grpc", reason="Python stubs missing: run `make stubs`"
)


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        # From the committed package-lock.json, exactly (same as `make node-deps`).
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=NODE_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="module")
def server(tiny_model_path, node_modules):
    with LiveServer(tiny_model_path, extra_args=("--auth-token", TOKEN)) as live:
        yield live


def run_node(
    *args: str, target: str, token: str | None = TOKEN, timeout: float = 120
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_CLIENT_")}
    if token is not None:
        env["QWEN_CLIENT_TOKEN"] = token
    return subprocess.run(
        ["node", str(CLI), *args, "--target", target],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=NODE_DIR,
        env=env,
    )


def python_complete(target: str, **overrides) -> pb2.CompleteResponse:
    import grpc

    request = pb2.GenerateRequest(
        prompt=PROMPT,
        sampling=pb2.SamplingParams(temperature=0.0),
        stopping=pb2.StoppingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
        **overrides,
    )
    with grpc.insecure_channel(target) as channel:
        return pb2_grpc.QwenServeStub(channel).Complete(
            request, timeout=60, metadata=[("authorization", f"Bearer {TOKEN}")]
        )


def test_node_test_suite_passes_against_the_live_server(server):
    result = subprocess.run(
        ["node", "--test", "test/"],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "QWEN_CLIENT_TARGET": server.target, "QWEN_CLIENT_TOKEN": TOKEN},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    counts = dict(re.findall(r"^# (pass|fail|skipped) (\d+)$", result.stdout, flags=re.MULTILINE))
    assert counts == {"pass": "7", "fail": "0", "skipped": "0"}, result.stdout[-2000:]


def test_node_cli_json_stream_matches_python_complete(server):
    result = run_node(
        "generate",
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
        "--temperature",
        "0",
        "--ignore-eos",
        "--json",
        target=server.target,
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert [e["event"] for e in events[:1] + events[-1:]] == ["started", "finished"]
    node_ids = [i for e in events if e["event"] == "token" for i in e["token"]["token_ids"]]
    node_text = "".join(e["token"]["text"] for e in events if e["event"] == "token")
    expected = python_complete(server.target)
    assert node_ids == list(expected.token_ids) and len(node_ids) == MAX_TOKENS
    assert node_text == expected.text
    assert events[-1]["finished"]["reason"] == "FINISH_REASON_LENGTH"


def test_node_cli_streams_text_and_a_summary(server):
    result = run_node(
        "generate",
        PROMPT,
        "--max-tokens",
        str(MAX_TOKENS),
        "--temperature",
        "0",
        "--ignore-eos",
        target=server.target,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == python_complete(server.target).text + "\n"
    assert re.search(rf"\[length: \d+ prompt \+ {MAX_TOKENS} generated tokens", result.stderr)


def test_node_cli_seeded_sampling_is_reproducible(server):
    args = ("generate", PROMPT, "--max-tokens", "8", "--temperature", "1", "--seed", "1234", "--json")
    first, second = (run_node(*args, target=server.target) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert json.loads(first.stdout.splitlines()[0])["started"]["seed"] == "1234"
    # Same ids, text and logprobs; how they are split into messages may differ (tokens that reach the
    # server together leave in one message).
    tokens = [[json.loads(line)["token"] for line in run.stdout.splitlines() if '"token"' in line]
              for run in (first, second)]
    streamed = [([i for t in run for i in t["token_ids"]], "".join(t["text"] for t in run),
                 [lp for t in run for lp in t.get("logprobs", [])]) for run in tokens]
    assert streamed[0] == streamed[1] and streamed[0][0]


def test_node_cli_reports_grpc_status_on_invalid_request(server):
    result = run_node("generate", PROMPT, "--temperature", "5", target=server.target)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "temperature" in result.stderr


def test_node_cli_without_the_token_is_unauthenticated(server):
    result = run_node("generate", PROMPT, "--max-tokens", "2", target=server.target, token=None)
    assert result.returncode == 1
    assert "UNAUTHENTICATED" in result.stderr
    wrong = run_node("info", target=server.target, token="wrong-token")
    assert wrong.returncode == 1 and "UNAUTHENTICATED" in wrong.stderr


def test_node_cli_info_and_tokenize(server):
    info = run_node("info", target=server.target)
    assert info.returncode == 0, info.stderr
    model_info = json.loads(info.stdout)
    assert model_info["architecture"] == "qwen2" and model_info["backend"] == "cpu"
    tokens = run_node("tokenize", "Hello world", target=server.target)
    assert tokens.returncode == 0, tokens.stderr
    assert len(json.loads(tokens.stdout)) >= 2


def test_node_cli_reports_unavailable_server():
    if shutil.which("node") is None:
        pytest.skip("node not installed")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.skip("node_modules missing (the live tests install them)")
    result = run_node("generate", PROMPT, "--timeout", "3", target="127.0.0.1:1")
    assert result.returncode == 1
    assert re.search(r"UNAVAILABLE|DEADLINE_EXCEEDED", result.stderr), result.stderr


def test_metrics_scrape_shows_tokens_and_ttft_after_generation(server):
    run_node(
        "generate", PROMPT, "--max-tokens", "4", "--temperature", "0", "--ignore-eos", target=server.target
    )
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

    def value(family: str, sample: str, **labels: str) -> float:
        return next(s.value for s in families[family].samples if s.name == sample and s.labels == labels)

    assert value("qwen_serve:generation_tokens", "qwen_serve:generation_tokens_total") >= 4
    assert value("qwen_serve:prompt_tokens", "qwen_serve:prompt_tokens_total") > 0
    ttft = "qwen_serve:time_to_first_token_seconds"
    assert value(ttft, ttft + "_count") >= 1
    assert value(ttft, ttft + "_bucket", le="+Inf") == value(ttft, ttft + "_count")
    assert value("qwen_serve:requests", "qwen_serve:requests_total", outcome="length") >= 1
    itl = "qwen_serve:inter_token_latency_seconds"
    assert value(itl, itl + "_count") >= 3  # 4 tokens, 3 gaps (at least)


def test_ctrl_c_in_the_node_cli_cancels_the_request_on_the_server(server):
    env = {**os.environ, "QWEN_CLIENT_TOKEN": TOKEN}
    command = ["node", str(CLI), "generate", PROMPT, "--max-tokens", "2000", "--ignore-eos", "--json"]
    process = subprocess.Popen(
        [*command, "--target", server.target],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        while '"token"' not in process.stdout.readline():  # streaming has begun
            assert process.poll() is None, process.stderr.read()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 1 and "CANCELLED" in stderr

    deadline = time.monotonic() + 5  # the worker drops the request within a step and frees its KV blocks
    while True:
        info = json.loads(run_node("info", target=server.target).stdout)
        if info.get("running_requests", 0) == 0 and info["kv_blocks_free"] == info["kv_blocks_total"]:
            break
        assert time.monotonic() < deadline, f"request still running after cancel: {info}"
        time.sleep(0.2)
    with urllib.request.urlopen(server.metrics_url, timeout=5) as response:
        samples = [s for f in text_string_to_metric_families(response.read().decode()) for s in f.samples]
    cancelled = [
        s.value for s in samples if s.labels == {"outcome": "cancelled"} and s.name.endswith("_total")
    ]
    assert cancelled and cancelled[0] >= 1
