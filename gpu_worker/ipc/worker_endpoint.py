"""The worker's end of the IPC: accept one front-end, pump its requests into the engine, publish
engine events. Requests are applied between engine steps on the main thread; a small heartbeat
thread bumps a liveness counter in the event ring header, and the main loop a progress counter.

A new connection gets freshly created rings (the previous ones are unlinked), so a restarted or
re-attached front-end never sees stale records. While the event ring is full the engine does not
step (back-pressure); it resumes when the front-end reports freed space.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from gpu_worker.engine.engine import Engine, EngineEvent, FinishOut, TokenOut
from gpu_worker.ipc import channel, messages
from gpu_worker.ipc.ring import RingError, ShmRing

log = logging.getLogger("qwen_serve.worker")


class WorkerEndpoint:
    def __init__(self, engine: Engine, socket_dir: str | os.PathLike[str], model_info: dict[str, Any],
                 request_ring_bytes: int = 1 << 20, event_ring_bytes: int = 4 << 20,
                 heartbeat_interval_s: float = 0.1, parent_pid: int | None = None) -> None:
        self.engine = engine
        # An owned worker (parent_pid given) exits with its front-end: parent gone or disconnected.
        self.parent_pid = parent_pid
        self.socket_dir = channel.prepare_socket_dir(socket_dir)
        self.model_info = model_info
        self.request_ring_bytes = request_ring_bytes
        self.event_ring_bytes = event_ring_bytes
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stop_requested = False
        self._conn: socket.socket | None = None
        self._requests: ShmRing | None = None
        self._events: ShmRing | None = None
        self._outbound: deque[tuple[int, bytes]] = deque()
        self._num_connections = 0
        self.num_event_ring_full = 0         # times publishing had to wait for the front-end
        self.stats_interval_s = 1.0
        self._last_stats_at = 0.0
        self._listener = self._listen()
        # The heartbeat thread touches the event ring; the lock keeps it off a ring being unmapped.
        self._ring_lock = threading.Lock()
        self._heartbeat_stop = threading.Event()
        # A TOKENS record must fit the ring with room to spare: <= 1/4 of it at worst-case size.
        self._tokens_per_record = max(1, (event_ring_bytes // 4) // messages.MAX_TOKEN_RECORD_BYTES)

    def _listen(self) -> socket.socket:
        path = channel.socket_path(self.socket_dir)
        if path.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
                raise RuntimeError(f"another worker is already listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)          # stale socket of a dead worker
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(4)
        return listener

    def serve_forever(self) -> None:
        """Run until SHUTDOWN or `stop_requested`; always removes socket and segments."""
        beater = threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True)
        beater.start()
        try:
            while not self.stop_requested:
                try:
                    self._iterate()
                except (OSError, RingError) as exc:      # a broken connection, not a broken worker
                    log.warning("dropping the front-end connection: %r", exc)
                    self._disconnect()
                    self.stop_requested = self.stop_requested or self.parent_pid is not None
        finally:
            self._heartbeat_stop.set()
            beater.join()
            self._disconnect()
            self._listener.close()
            channel.socket_path(self.socket_dir).unlink(missing_ok=True)

    def _beat_forever(self) -> None:
        while not self._heartbeat_stop.wait(self.heartbeat_interval_s):
            with self._ring_lock:
                if self._events is not None:
                    self._events.beat()

    def _iterate(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.info("parent %d is gone; exiting", self.parent_pid)
            self.stop_requested = True
            return
        if self._conn is None:
            if select.select([self._listener], [], [], self.heartbeat_interval_s)[0]:
                self._accept()
            return
        if not channel.drain_wakes(self._conn):
            log.info("front-end disconnected")
            self._disconnect()
            self.stop_requested = self.parent_pid is not None
            return
        self._handle_requests()
        assert self._events is not None
        self._events.advance()
        self._publish_periodic_stats()
        self._flush_outbound()      # anything still queued means the ring is full: do not step
        if self.engine.has_work and not self._outbound and not self.stop_requested:
            self._publish(self.engine.step())
            self._flush_outbound()
        else:
            ready = select.select([self._conn, self._listener], [], [], self.heartbeat_interval_s)[0]
            if self._listener in ready:
                self._reject_extra_client()

    def _publish_periodic_stats(self) -> None:
        """Unsolicited stats (nonce 0) once per stats interval, for metrics without polling."""
        now = time.monotonic()
        if now - self._last_stats_at >= self.stats_interval_s:
            self._last_stats_at = now
            self._outbound.append((messages.STATS, messages.encode_stats(self._stats(0))))

    def _stats(self, nonce: int) -> dict[str, Any]:
        return {"nonce": nonce, **self.engine.stats(), "event_ring_full": self.num_event_ring_full}

    def _accept(self) -> None:
        conn, _ = self._listener.accept()
        try:
            channel.check_hello(channel.recv_line(conn, timeout_s=5.0))
        except (channel.HandshakeError, OSError) as exc:
            log.warning("handshake failed: %s", exc)
            conn.close()
            return
        self._num_connections += 1
        base = f"{channel.segment_prefix(self.socket_dir)}-{os.getpid()}-{self._num_connections}"
        requests = ShmRing.create(f"{base}-req", self.request_ring_bytes)
        events = ShmRing.create(f"{base}-evt", self.event_ring_bytes)
        with self._ring_lock:
            self._requests, self._events = requests, events
        reply = {**channel.hello(), "ok": True, "request_ring": self._requests.name,
                 "event_ring": self._events.name, "model_info": self.model_info}
        channel.send_line(conn, reply)
        conn.setblocking(False)
        self._conn = conn
        log.info("front-end connected (rings %s-*)", base)

    def _reject_extra_client(self) -> None:
        extra, _ = self._listener.accept()
        try:
            channel.send_line(extra, {**channel.hello(), "ok": False, "error": "worker busy with another front-end"})
        except OSError:
            pass
        extra.close()

    def _disconnect(self) -> None:
        """Drop the front-end: its requests are aborted (KV freed) and its rings removed."""
        self.engine.abort_all()
        self._outbound.clear()
        with self._ring_lock:
            rings, self._requests, self._events = (self._requests, self._events), None, None
        for ring in rings:
            if ring is not None:
                ring.mark_closed()
                ring.close()
                ring.unlink()
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _handle_requests(self) -> None:
        assert self._requests is not None and self._conn is not None
        for msg_type, payload in self._requests.read_all():
            self._publish(self._apply(msg_type, payload))
        if self._requests.writer_waiting():
            self._requests.set_writer_waiting(False)
            channel.send_wake(self._conn)

    def _apply(self, msg_type: int, payload: bytes) -> list[EngineEvent]:
        if msg_type == messages.SUBMIT:
            try:
                spec = messages.decode_submit(payload)
            except ValueError as exc:
                log.warning("bad SUBMIT dropped: %s", exc)
                key = messages.decode_key(payload[:8]) if len(payload) >= 8 else 0
                return [FinishOut(key, "error", 0, 0, 0, 0, 0, f"bad request: {exc}")]
            return self.engine.add_request(spec)
        if msg_type == messages.ABORT:
            return self.engine.abort(messages.decode_key(payload))
        if msg_type == messages.STATS_REQUEST:
            self._outbound.append((messages.STATS, messages.encode_stats(self._stats(messages.decode_key(payload)))))
        elif msg_type == messages.SHUTDOWN:
            self.stop_requested = True
        else:
            log.warning("unknown message type %d ignored", msg_type)
        return []

    def _publish(self, events: list[EngineEvent]) -> None:
        tokens = [e for e in events if isinstance(e, TokenOut)]
        for start in range(0, len(tokens), self._tokens_per_record):
            chunk = tokens[start:start + self._tokens_per_record]
            self._outbound.append((messages.TOKENS, messages.encode_tokens(chunk)))
        for e in events:
            if isinstance(e, FinishOut):
                self._outbound.append((messages.FINISHED, messages.encode_finished(e)))

    def _flush_outbound(self) -> None:
        """Write queued records; on a full ring ask the front-end to wake us when it has read."""
        assert self._events is not None and self._conn is not None
        wrote = False
        while self._outbound:
            msg_type, payload = self._outbound[0]
            if not self._events.try_write(msg_type, payload):
                self.num_event_ring_full += 1
                self._events.set_writer_waiting(True)
                if self._events.try_write(msg_type, payload):     # space freed meanwhile
                    self._events.set_writer_waiting(False)
                else:
                    break
            self._outbound.popleft()
            wrote = True
        if wrote or self._outbound:
            channel.send_wake(self._conn)


def wait_for_socket(socket_dir: str | os.PathLike[str], timeout_s: float) -> Path:
    """Block until a worker socket exists in socket_dir (for scripts starting a worker)."""
    path = channel.socket_path(socket_dir)
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no worker socket at {path} after {timeout_s} s")
        time.sleep(0.05)
    return path
