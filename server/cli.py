"""`qwen-serve`: serve (default), worker, fetch-model, convert.

Every `serve` flag has an environment-variable equivalent QWEN_SERVE_<FLAG> (dashes as underscores,
e.g. QWEN_SERVE_AUTH_TOKEN); an explicit flag wins over the environment.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from server.config import ServeConfig

SUBCOMMANDS = ("serve", "worker", "fetch-model", "convert")
ENV_PREFIX = "QWEN_SERVE_"


def _env(name: str, default: object = None) -> object:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _env_bool(name: str) -> bool:
    value = str(_env(name, "")).strip().lower()
    return value in ("1", "true", "yes", "on")


def _optional_int(text: str) -> int | None:
    return None if text in ("", "none") else int(text)


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--host", default=_env("host", "127.0.0.1"),
        help="address to listen on (default 127.0.0.1: loopback only; 0.0.0.0 exposes the service) "
             "[QWEN_SERVE_HOST]")
    add("--port", type=int, default=int(str(_env("port", 50051))),
        help="gRPC port; 0 picks a free one and prints it (default 50051) [QWEN_SERVE_PORT]")
    add("--model", default=_env("model"),
        help="GGUF file to serve (default: the fetched default model, Qwen2.5-Coder-0.5B-Instruct "
             "Q4_K_M) [QWEN_SERVE_MODEL]")
    add("--backend", choices=("auto", "cpu", "cuda"), default=_env("backend", "auto"),
        help="auto = cuda when a GPU and PyCUDA are usable, else cpu (numpy) [QWEN_SERVE_BACKEND]")
    add("--attach", metavar="SOCKET_DIR", default=_env("attach"),
        help="attach to an already running worker through this socket directory instead of spawning "
             "one (docker-compose) [QWEN_SERVE_ATTACH]")
    add("--max-queue", type=int, default=int(str(_env("max-queue", 64))),
        help="requests waiting for the worker beyond which new ones get RESOURCE_EXHAUSTED "
             "(default 64) [QWEN_SERVE_MAX_QUEUE]")
    add("--kv-cache-gb", type=float, default=_env("kv-cache-gb"),
        help="KV cache size in GiB (default: the worker picks from free memory) [QWEN_SERVE_KV_CACHE_GB]")
    add("--max-batch", type=int, default=int(str(_env("max-batch", 32))),
        help="most sequences in one engine step (default 32) [QWEN_SERVE_MAX_BATCH]")
    add("--max-tokens-per-step", type=_optional_int,
        default=_optional_int(str(_env("max-tokens-per-step", ""))),
        help="token budget of one engine step: prompt chunks plus one token per decoding sequence "
             "(default: 2048 on cuda, 256 on cpu) [QWEN_SERVE_MAX_TOKENS_PER_STEP]")
    add("--grace-period", type=float, default=float(str(_env("grace-period", 30.0))),
        help="seconds in-flight requests may run after SIGTERM (default 30) [QWEN_SERVE_GRACE_PERIOD]")
    add("--tls-cert", default=_env("tls-cert"),
        help="PEM server certificate; with --tls-key turns TLS on [QWEN_SERVE_TLS_CERT]")
    add("--tls-key", default=_env("tls-key"), help="PEM private key for --tls-cert [QWEN_SERVE_TLS_KEY]")
    add("--auth-token", default=_env("auth-token"),
        help="require 'authorization: Bearer <token>' metadata on every call (UNAUTHENTICATED "
             "otherwise); prefer the env var so the token is not visible in ps [QWEN_SERVE_AUTH_TOKEN]")
    add("--auth-health", action="store_true", default=_env_bool("auth-health"),
        help="also require the token for grpc.health.v1 (default: health is exempt) "
             "[QWEN_SERVE_AUTH_HEALTH=1]")
    add("--metrics-port", type=_optional_int, default=_optional_int(str(_env("metrics-port", ""))),
        help="serve Prometheus metrics over HTTP on this port (default: off) [QWEN_SERVE_METRICS_PORT]")
    add("--no-prefix-cache", action="store_true", default=_env_bool("no-prefix-cache"),
        help="turn off the worker's prefix cache (reuse of KV blocks of repeated prompt prefixes; on by "
             "default, outputs are the same either way) [QWEN_SERVE_NO_PREFIX_CACHE=1]")
    add("--stream-messages-per-s", type=float, default=float(str(_env("stream-messages-per-s", 8000))),
        help="token messages per second the front-end aims at over all streams: with many streams, "
             "each one's tokens are sent together, one message per stream every generating streams / "
             "this seconds at most (256 streams: every 32 ms); first tokens and ends go out at once; "
             "0 sends every token as soon as it is made (default 8000) [QWEN_SERVE_STREAM_MESSAGES_PER_S]")
    add("--log-json", action="store_true", default=_env_bool("log-json"),
        help="one JSON object per log line [QWEN_SERVE_LOG_JSON=1]")
    add("--log-requests", action="store_true", default=_env_bool("log-requests"),
        help="DEBUG: also log prompt and generated text (off by default: no request content in logs) "
             "[QWEN_SERVE_LOG_REQUESTS=1]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-serve",
        description="gRPC inference server for Qwen2.5-0.5B-class GGUF models. With no subcommand, "
                    "'serve' runs. Every serve flag can be set as QWEN_SERVE_<FLAG> in the environment.")
    subparsers = parser.add_subparsers(dest="command", metavar="{serve,worker,fetch-model,convert}")
    serve = subparsers.add_parser("serve", help="run the gRPC service (spawns the worker unless --attach)")
    _add_serve_flags(serve)
    worker = subparsers.add_parser(
        "worker", help="run the model worker process (what serve spawns; run it alone for --attach)",
        add_help=False)
    worker.add_argument("worker_args", nargs=argparse.REMAINDER,
                        help="arguments for the worker (see 'qwen-serve worker --help')")
    subparsers.add_parser("fetch-model", help="download and verify the default model into the cache")
    convert = subparsers.add_parser("convert", help="rewrite a GGUF file with other tensor types")
    convert.add_argument("--to", choices=("f16",), required=True, help="target weight type")
    convert.add_argument("src", help="input GGUF file")
    convert.add_argument("dst", help="output GGUF file")
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    kv_cache_gb = None if args.kv_cache_gb in (None, "") else float(args.kv_cache_gb)
    return ServeConfig(
        host=args.host, port=args.port, model_path=args.model, backend=args.backend,
        attach_dir=args.attach, max_queue=args.max_queue, kv_cache_gb=kv_cache_gb,
        max_batch=args.max_batch, max_tokens_per_step=args.max_tokens_per_step,
        prefix_cache=not args.no_prefix_cache,
        grace_period_s=args.grace_period, tls_cert=args.tls_cert,
        tls_key=args.tls_key, auth_token=args.auth_token, auth_exempt_health=not args.auth_health,
        metrics_port=args.metrics_port, log_json=args.log_json, log_requests=args.log_requests,
        stream_messages_per_s=args.stream_messages_per_s)


def _run_serve(args: argparse.Namespace) -> int:
    from server.app import run_server  # imported late: grpc start-up is not needed by fetch-model

    return run_server(config_from_args(args))


def _run_worker(args: argparse.Namespace) -> int:
    from gpu_worker import worker_main

    return int(worker_main.main(list(args.worker_args)) or 0)


def _run_fetch_model(args: argparse.Namespace) -> int:
    from gpu_worker.model.fetch import fetch_default_model

    print(fetch_default_model())
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from gpu_worker.model.convert import convert_to_f16

    convert_to_f16(args.src, args.dst)
    print(args.dst)
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _run_serve, "worker": _run_worker, "fetch-model": _run_fetch_model, "convert": _run_convert,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["serve", *argv]   # serve is the default subcommand
    if argv[0] == "worker":   # argparse's REMAINDER rejects a leading "--flag": hand the rest over as is
        return _run_worker(argparse.Namespace(worker_args=argv[1:]))
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except ValueError as error:   # bad configuration: one line, no traceback
        parser.error(str(error))
    except KeyboardInterrupt:
        return 130
    except Exception as error:    # a bad model file or path (GGUFLoadError, OSError): one line, exit 1
        if not _is_user_error(error):
            raise
        print(f"qwen-serve {args.command}: {error}", file=sys.stderr)
        return 1


def _is_user_error(error: Exception) -> bool:
    from gpu_worker.model.errors import GGUFLoadError

    return isinstance(error, (GGUFLoadError, OSError))


if __name__ == "__main__":
    sys.exit(main())
