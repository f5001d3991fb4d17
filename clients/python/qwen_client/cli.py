"""`qwen-client`: generate, chat, tokenize, info, health against a qwen-serve server.

Text streams to the terminal as it arrives; `--json` prints one JSON object per event instead.
Connection flags have env equivalents: QWEN_CLIENT_TARGET, QWEN_CLIENT_TOKEN (or QWEN_SERVE_AUTH_TOKEN),
QWEN_CLIENT_TLS_CA.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from qwen_client.client import DEFAULT_TARGET, QwenClient, QwenError
from qwen_client.types import Finished, GenerateOptions, Started, TokenDelta, as_json

CHAT_ROLES = ("system", "user", "assistant", "tool")


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=os.environ.get("QWEN_CLIENT_TARGET", DEFAULT_TARGET),
                        help=f"server address host:port (default {DEFAULT_TARGET}) [QWEN_CLIENT_TARGET]")
    parser.add_argument("--token", default=os.environ.get("QWEN_CLIENT_TOKEN")
                        or os.environ.get("QWEN_SERVE_AUTH_TOKEN"),
                        help="bearer token, when the server requires one [QWEN_CLIENT_TOKEN]")
    parser.add_argument("--tls", action="store_true", help="connect with TLS (system roots unless --tls-ca)")
    parser.add_argument("--tls-ca", default=os.environ.get("QWEN_CLIENT_TLS_CA"),
                        help="PEM file of the CA that signed the server certificate (implies --tls)")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    parser.add_argument("--json", action="store_true", help="one JSON object per event/result on stdout")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--temperature", type=float, help="0 = greedy; range [0, 2] (server default 1.0)")
    add("--top-k", type=int, help="keep the k most likely tokens (0 = off)")
    add("--top-p", type=float, help="nucleus mass in (0, 1]")
    add("--min-p", type=float, help="drop tokens below min_p * p_max, [0, 1]")
    add("--repetition-penalty", type=float, help="(0, 10], 1 = off")
    add("--presence-penalty", type=float, help="[-2, 2]")
    add("--frequency-penalty", type=float, help="[-2, 2]")
    add("--seed", type=int, help="RNG seed (default: the server picks one and reports it)")
    add("--logit-bias", action="append", default=[], metavar="ID=BIAS", help="add BIAS to token ID (repeatable)")
    add("--max-tokens", type=int, help="most new tokens (server default 256)")
    add("--stop", action="append", default=[], help="stop string (repeatable, up to 8)")
    add("--stop-token-id", type=int, action="append", default=[], help="extra token id that ends generation")
    add("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    add("--logprobs", action="store_true", help="return each token's log-probability")
    add("--top-logprobs", type=int, default=0, help="also return this many alternatives per token (0-20)")
    add("--request-id", default="", help="id for logs and Abort (default: the server assigns one)")


def _options(args: argparse.Namespace) -> GenerateOptions:
    bias: dict[int, float] = {}
    for entry in args.logit_bias:
        token_id, _, value = entry.partition("=")
        bias[int(token_id)] = float(value)
    return GenerateOptions(
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty, seed=args.seed, logit_bias=bias, max_tokens=args.max_tokens,
        stop=tuple(args.stop), stop_token_ids=tuple(args.stop_token_id), ignore_eos=args.ignore_eos,
        logprobs=args.logprobs, top_logprobs=args.top_logprobs, request_id=args.request_id)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen-client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="complete a raw prompt (no chat template), streaming")
    generate.add_argument("prompt", help="prompt text ('-' reads stdin)")
    chat = commands.add_parser("chat", help="chat with the model's own template, streaming")
    chat.add_argument("message", nargs="?", help="the user message ('-' reads stdin)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--message", dest="messages", action="append", default=[], metavar="ROLE:CONTENT",
                      help="an earlier turn, e.g. user:hi or assistant:hello (repeatable, in order)")
    for sub in (generate, chat):
        _connection_flags(sub)
        _sampling_flags(sub)
    tokenize = commands.add_parser("tokenize", help="text to token ids with the model's tokenizer")
    tokenize.add_argument("text", help="text ('-' reads stdin)")
    _connection_flags(tokenize)
    for name, text in (("info", "what the server is serving and on what"),
                       ("health", "grpc.health.v1 status (exit 0 only when SERVING)")):
        _connection_flags(commands.add_parser(name, help=text))
    return parser


def _read(text: str) -> str:
    return sys.stdin.read() if text == "-" else text


def _chat_messages(args: argparse.Namespace) -> list[tuple[str, str]]:
    messages = [("system", args.system)] if args.system else []
    for entry in args.messages:
        role, sep, content = entry.partition(":")
        if not sep or role not in CHAT_ROLES:
            raise ValueError(f"--message must be ROLE:CONTENT with ROLE in {', '.join(CHAT_ROLES)}, got {entry!r}")
        messages.append((role, content))
    if args.message is not None:
        messages.append(("user", _read(args.message)))
    if not messages:
        raise ValueError("give a message (or --message ROLE:CONTENT)")
    return messages


def _stream(events: Any, as_json_lines: bool, out: TextIO) -> int:
    for event in events:
        if as_json_lines:
            out.write(json.dumps(as_json(event), ensure_ascii=False) + "\n")
        elif isinstance(event, TokenDelta):
            out.write(event.text)
        elif isinstance(event, Finished):
            out.write("\n")
            print(f"[{event.reason}: {event.prompt_tokens} prompt + {event.completion_tokens} generated tokens, "
                  f"first token after {event.time_to_first_token_ns / 1e6:.0f} ms]", file=sys.stderr)
        elif isinstance(event, Started):
            pass
        out.flush()
    return 0


def _client(args: argparse.Namespace) -> QwenClient:
    root = None
    if args.tls_ca:
        with open(args.tls_ca, "rb") as handle:
            root = handle.read()
    return QwenClient(args.target, token=args.token, tls=args.tls, root_certificates=root, timeout_s=args.timeout)


def run(args: argparse.Namespace, out: TextIO) -> int:
    with _client(args) as client:
        if args.command == "generate":
            return _stream(client.generate(_read(args.prompt), _options(args)), args.json, out)
        if args.command == "chat":
            return _stream(client.chat(_chat_messages(args), _options(args)), args.json, out)
        if args.command == "tokenize":
            tokens = client.tokenize(_read(args.text))
            out.write(json.dumps(as_json(tokens), ensure_ascii=False) + "\n" if args.json
                      else " ".join(str(i) for i in tokens.ids) + "\n")
            return 0
        if args.command == "info":
            out.write(json.dumps(client.model_info(), indent=None if args.json else 2) + "\n")
            return 0
        status = client.health()
        out.write(json.dumps({"status": status}) + "\n" if args.json else status + "\n")
        return 0 if status == "SERVING" else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args, sys.stdout)
    except QwenError as error:
        print(f"qwen-client: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        print(f"qwen-client: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
