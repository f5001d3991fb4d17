"""The front-end's end of the IPC: connect + handshake, attach the worker's rings, send records
with back-pressure, receive event records. Synchronous and non-blocking after connect; the
asyncio side (server.worker_client) registers `sock` with its loop.
"""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

from gpu_worker.ipc import channel
from gpu_worker.ipc.ring import RingError, ShmRing, unlink_segment


class ClientConnection:
    def __init__(self, sock: socket.socket, ready: dict[str, Any]) -> None:
        self.sock = sock
        self.model_info: dict[str, Any] = ready.get("model_info", {})
        self.worker_pid: int = int(ready.get("pid", 0))
        self.segment_names = (str(ready["request_ring"]), str(ready["event_ring"]))
        self.requests = ShmRing.attach(self.segment_names[0])
        self.num_request_ring_full = 0       # times a send had to wait for the worker
        try:
            self.events = ShmRing.attach(self.segment_names[1])
        except RingError:
            self.requests.close()
            raise

    @classmethod
    def connect(cls, socket_dir: str | Path, timeout_s: float = 10.0) -> ClientConnection:
        """Connect to the worker listening in socket_dir; raises OSError / HandshakeError."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(str(channel.socket_path(socket_dir)))
            channel.send_line(sock, channel.hello())
            ready = channel.recv_line(sock, timeout_s)
            channel.check_hello(ready)
            if not ready.get("ok"):
                raise channel.HandshakeError(f"worker refused: {ready.get('error', 'no reason given')}")
            conn = cls(sock, ready)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return conn

    def try_send(self, msg_type: int, payload: bytes) -> bool:
        """Write one request record and wake the worker; False when the ring is full (the worker
        will wake us after it has read, see `writer_waiting`)."""
        if not self.requests.try_write(msg_type, payload):
            self.num_request_ring_full += 1
            self.requests.set_writer_waiting(True)
            if not self.requests.try_write(msg_type, payload):
                return False
            self.requests.set_writer_waiting(False)
        channel.send_wake(self.sock)
        return True

    def receive(self) -> list[tuple[int, bytes]]:
        """All event records available now; tells a blocked worker that space was freed."""
        records = self.events.read_all()
        if self.events.writer_waiting():
            self.events.set_writer_waiting(False)
            channel.send_wake(self.sock)
        return records

    def drain_wakes(self) -> bool:
        """False when the worker has closed the socket (exited, crashed or was killed)."""
        return channel.drain_wakes(self.sock)

    def heartbeat(self) -> int:
        return self.events.heartbeat()

    def progress(self) -> int:
        return self.events.progress()

    def close(self, unlink: bool) -> None:
        """Close socket and mappings; `unlink` removes the segments (the worker is dead)."""
        self.sock.close()
        self.requests.close()
        self.events.close()
        if unlink:
            for name in self.segment_names:
                unlink_segment(name)
