"""The Unix-socket side channel: socket dir, handshake, wake-up bytes, segment names.

The socket carries only (1) one JSON line each way at connect (hello / ready, naming the ring
segments) and (2) single wake-up bytes afterwards: "new records in a ring", or "space freed"
when the other side set `writer_waiting`. EOF on it means the peer is gone (kill -9 included),
which is how the front-end notices a dead worker at once. Segment names come from the worker
in the handshake, so two containers sharing /dev/shm need not share any other path.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

PROTOCOL = "qwen-serve-ipc"
PROTOCOL_VERSION = 1
SOCKET_NAME = "worker.sock"
WAKE = b"\x01"
MAX_LINE_BYTES = 1 << 20


class HandshakeError(RuntimeError):
    pass


def prepare_socket_dir(path: str | os.PathLike[str]) -> Path:
    """Create the dir 0700 if needed; refuse one that others can enter or that is not ours."""
    p = Path(path)
    p.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = p.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"socket dir {p} is owned by uid {st.st_uid}, not {os.getuid()}")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, 0o700)
    return p


def socket_path(socket_dir: str | os.PathLike[str]) -> Path:
    return Path(socket_dir) / SOCKET_NAME


def segment_prefix(socket_dir: str | os.PathLike[str]) -> str:
    """Names of one socket dir's segments share this prefix (lets tests and admins find them)."""
    digest = hashlib.sha256(str(Path(socket_dir).resolve()).encode()).hexdigest()[:12]
    return f"qwen-serve-{digest}"


def send_line(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(json.dumps(obj).encode() + b"\n")


def recv_line(sock: socket.socket, timeout_s: float) -> dict[str, Any]:
    """Read one JSON line byte by byte (so no wake-up byte after it is swallowed)."""
    deadline = time.monotonic() + timeout_s
    buf = bytearray()
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise HandshakeError("handshake timed out")
        sock.settimeout(remaining)
        chunk = sock.recv(1)
        if not chunk:
            raise HandshakeError("peer closed the connection during the handshake")
        buf += chunk
        if len(buf) > MAX_LINE_BYTES:
            raise HandshakeError("handshake line too long")
    try:
        obj = json.loads(buf)
    except ValueError as exc:
        raise HandshakeError(f"handshake line is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise HandshakeError("handshake line is not a JSON object")
    return obj


def hello() -> dict[str, Any]:
    return {"protocol": PROTOCOL, "version": PROTOCOL_VERSION, "pid": os.getpid()}


def check_hello(obj: dict[str, Any]) -> None:
    if obj.get("protocol") != PROTOCOL or obj.get("version") != PROTOCOL_VERSION:
        raise HandshakeError(f"peer speaks {obj.get('protocol')!r} v{obj.get('version')}, "
                             f"expected {PROTOCOL!r} v{PROTOCOL_VERSION}")


def send_wake(sock: socket.socket) -> None:
    """Non-blocking one-byte wake-up that never raises."""
    try:
        sock.send(WAKE, socket.MSG_DONTWAIT)
    except OSError:
        pass      # full buffer: wake-ups pending anyway; peer gone: its EOF is seen by drain_wakes


def drain_wakes(sock: socket.socket) -> bool:
    """Consume pending wake-up bytes without blocking; False when the peer has closed (EOF)."""
    while True:
        try:
            data = sock.recv(4096, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        if not data:
            return False
        if len(data) < 4096:
            return True
