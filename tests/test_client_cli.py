"""`qwen-client` against a live server: streamed text, --json events, chat, tokenize, info, health."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from qwen_client import GenerateOptions, QwenClient
from qwen_client.cli import main

from server.background import BackgroundServer
from server.config import ServeConfig


@pytest.fixture(scope="module")
def server(tiny_model_path) -> Iterator[BackgroundServer]:
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu")
    with BackgroundServer(config) as running:
        yield running


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_streams_the_same_text_as_complete(server: BackgroundServer, capsys) -> None:
    code, out, err = _run(capsys, "generate", "Write a haiku", "--target", server.target, "--seed", "3",
                          "--max-tokens", "10", "--ignore-eos", "--temperature", "0.8", "--top-p", "0.9")
    with QwenClient(server.target) as client:
        expected = client.complete("Write a haiku", GenerateOptions(seed=3, max_tokens=10, ignore_eos=True,
                                                                   temperature=0.8, top_p=0.9))
    assert code == 0
    assert out == expected.text + "\n"
    assert "[length: " in err and "10 generated tokens" in err


def test_json_prints_one_object_per_event(server: BackgroundServer, capsys) -> None:
    code, out, _ = _run(capsys, "generate", "Hello", "--target", server.target, "--json", "--seed", "1",
                        "--max-tokens", "5", "--ignore-eos", "--logprobs", "--top-logprobs", "2",
                        "--logit-bias", "11=0.5", "--stop-token-id", "13", "--request-id", "cli-json")
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert [e["event"] for e in events] == ["started"] + ["token"] * (len(events) - 2) + ["finished"]
    assert events[0]["request_id"] == "cli-json" and events[0]["seed"] == 1
    tokens = [e for e in events if e["event"] == "token"]
    assert sum(len(e["token_ids"]) for e in tokens) == events[-1]["completion_tokens"]
    assert all(len(lp["top"]) == 2 for e in tokens for lp in e["logprobs"])


def test_chat_with_system_and_earlier_turns(server: BackgroundServer, capsys) -> None:
    code, out, _ = _run(capsys, "chat", "and now?", "--system", "be brief", "--message", "user:hi",
                        "--message", "assistant:hello", "--target", server.target, "--json",
                        "--temperature", "0", "--max-tokens", "3")
    with QwenClient(server.target) as client:
        prompt = client.tokenize(messages=[("system", "be brief"), ("user", "hi"), ("assistant", "hello"),
                                           ("user", "and now?")])
    events = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and events[0]["prompt_tokens"] == len(prompt.ids)


def test_tokenize_info_and_health(server: BackgroundServer, capsys) -> None:
    code, out, _ = _run(capsys, "tokenize", "Hello world", "--target", server.target)
    assert code == 0 and out.split() == ["9707", "1879"]
    code, out, _ = _run(capsys, "info", "--target", server.target)
    assert code == 0 and json.loads(out)["architecture"] == "qwen2"
    code, out, _ = _run(capsys, "health", "--target", server.target)
    assert (code, out) == (0, "SERVING\n")


def test_errors_exit_2_with_the_servers_message(server: BackgroundServer, capsys) -> None:
    code, out, err = _run(capsys, "generate", "Hi", "--target", server.target, "--temperature", "3")
    assert code == 2 and out == ""
    assert "INVALID_ARGUMENT: sampling.temperature: must be in [0, 2], got 3.0" in err
    code, _, err = _run(capsys, "chat", "--message", "wizard:hi", "--target", server.target)
    assert code == 2 and "--message must be ROLE:CONTENT" in err


def test_health_of_a_closed_port_is_unavailable(capsys) -> None:
    code, _, err = _run(capsys, "health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert code == 2 and "UNAVAILABLE" in err
