"""Nothing exposed by default: loopback bind, TLS, bearer-token auth (health exempt by option),
no request content in logs unless asked."""
from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from qwen_client import GenerateOptions, QwenClient, QwenError

from server.background import BackgroundServer
from server.cli import build_parser, config_from_args
from server.config import ServeConfig

TOKEN = "s3cret-token"
SECRET_PROMPT = "my-private-prompt-4711"


def test_default_bind_is_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOST", "PORT", "AUTH_TOKEN"):
        monkeypatch.delenv(f"QWEN_SERVE_{name}", raising=False)
    config = config_from_args(build_parser().parse_args(["serve"]))
    assert (config.host, config.port, config.auth_token, config.uses_tls) == ("127.0.0.1", 50051, None, False)
    assert ServeConfig().host == "127.0.0.1"


def test_env_vars_configure_serve_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QWEN_SERVE_PORT", "6000")
    monkeypatch.setenv("QWEN_SERVE_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("QWEN_SERVE_LOG_JSON", "1")
    config = config_from_args(build_parser().parse_args(["serve", "--port", "7000"]))
    assert (config.port, config.auth_token, config.log_json) == (7000, TOKEN, True)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    return cert, key


@pytest.fixture(scope="module")
def secure_server(tiny_model_path: Path, tls_files: tuple[Path, Path]) -> Iterator[BackgroundServer]:
    cert, key = tls_files
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu", auth_token=TOKEN,
                         tls_cert=str(cert), tls_key=str(key))
    with BackgroundServer(config) as running:
        yield running


def _client(server: BackgroundServer, cert: Path, token: str | None) -> QwenClient:
    return QwenClient(server.target, token=token, root_certificates=cert.read_bytes(), timeout_s=30,
                      server_name_override="localhost")


def test_tls_with_the_right_token_works(secure_server: BackgroundServer, tls_files: tuple[Path, Path]) -> None:
    with _client(secure_server, tls_files[0], TOKEN) as client:
        assert client.complete("hi", GenerateOptions(max_tokens=2, ignore_eos=True)).finished.completion_tokens == 2
        assert client.model_info()["backend"] == "cpu"


@pytest.mark.parametrize("token", [None, "wrong", TOKEN + "x"])
def test_missing_or_wrong_token_is_unauthenticated_on_every_rpc(
        secure_server: BackgroundServer, tls_files: tuple[Path, Path], token: str | None) -> None:
    with _client(secure_server, tls_files[0], token) as client:
        calls = (lambda: client.complete("hi", GenerateOptions(max_tokens=1)),
                 lambda: list(client.generate("hi", GenerateOptions(max_tokens=1))),
                 lambda: client.tokenize("hi"), lambda: client.detokenize([1]), client.model_info,
                 lambda: client.abort("x"))
        for call in calls:
            with pytest.raises(QwenError) as caught:
                call()
            assert caught.value.code == "UNAUTHENTICATED"
        assert client.health() == "SERVING"       # health is exempt by default


def test_plaintext_client_cannot_talk_to_a_tls_server(secure_server: BackgroundServer) -> None:
    with QwenClient(secure_server.target, token=TOKEN, timeout_s=5) as client:
        with pytest.raises(QwenError) as caught:
            client.health()
        assert caught.value.code == "UNAVAILABLE"


def test_health_can_require_the_token_too(tiny_model_path: Path) -> None:
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu", auth_token=TOKEN,
                         auth_exempt_health=False)
    with BackgroundServer(config) as server, QwenClient(server.target, timeout_s=10) as anonymous, \
                QwenClient(server.target, token=TOKEN, timeout_s=10) as member:
        with pytest.raises(QwenError, match="UNAUTHENTICATED"):
            anonymous.health()
        assert member.health() == "SERVING"


def _generate_secretly(target: str) -> None:
    with QwenClient(target, timeout_s=30) as client:
        client.complete(SECRET_PROMPT, GenerateOptions(max_tokens=2, ignore_eos=True))
        with pytest.raises(QwenError):
            client.complete(SECRET_PROMPT, GenerateOptions(max_tokens=0))


@pytest.mark.parametrize("log_requests", [False, True])
def test_request_content_is_logged_only_with_the_debug_flag(
        tiny_model_path: Path, caplog: pytest.LogCaptureFixture, log_requests: bool) -> None:
    config = ServeConfig(port=0, model_path=str(tiny_model_path), backend="cpu", log_requests=log_requests)
    with caplog.at_level(logging.DEBUG, logger="qwen_serve"), BackgroundServer(config) as server:
        _generate_secretly(server.target)
    logged = "\n".join(record.getMessage() + str(getattr(record, "fields", "")) for record in caplog.records)
    assert "generation finished" in logged
    assert (SECRET_PROMPT in logged) is log_requests


def test_unknown_method_and_oversized_messages_are_refused(secure_server: BackgroundServer,
                                                           tls_files: tuple[Path, Path]) -> None:
    credentials = grpc.ssl_channel_credentials(tls_files[0].read_bytes())
    with grpc.secure_channel(secure_server.target, credentials,
                             options=[("grpc.ssl_target_name_override", "localhost"),
                                      ("grpc.max_send_message_length", 64 << 20)]) as channel:
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/qwen_serve.v1.QwenServe/Nope")(b"", timeout=5, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        huge = b"\x0a\x80\x80\x80\x02" + b"a" * (1 << 25)   # a 32 MiB prompt field > 16 MiB limit
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/qwen_serve.v1.QwenServe/Complete")(huge, timeout=10, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
