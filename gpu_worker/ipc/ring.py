"""A single-producer single-consumer byte ring in a shared-memory file (/dev/shm, mode 0600).

Layout (little endian):
  header [HEADER_BYTES]: magic "QWSRING1" | version u32 | pad u32 | then u64 slots:
      capacity, write_pos, read_pos, writer_waiting, heartbeat, next_seq, closed, progress
  data   [capacity]: records, each = u32 payload_len | u16 msg_type | u16 pad | u64 seq | payload,
      padded to 8 bytes. Positions are monotonic byte counters; a record may wrap around the
      end of the data area (copied in two parts).
Only the producer writes write_pos/next_seq/heartbeat, only the consumer read_pos; a position
is published (one aligned 8-byte store through a numpy view) after the bytes it covers; x86-64
keeps stores in order (TSO), so the consumer never sees a position before its bytes. Weakly
ordered CPUs (ARM64) would need explicit fences here: not supported yet. A full ring refuses the write (`try_write` -> False): the producer sets
`writer_waiting` and waits for the consumer's wake-up — back-pressure, never loss.
"""
from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"QWSRING1"
VERSION = 1
HEADER_BYTES = 128
RECORD_HEADER = struct.Struct("<IHHQ")      # payload_len, msg_type, pad, seq
# u64 slot indexes in the header (slot 0 holds magic, slot 1 version + pad)
_CAPACITY, _WRITE, _READ, _WAITING, _HEARTBEAT, _NEXT_SEQ, _CLOSED, _PROGRESS = range(2, 10)


class RingError(RuntimeError):
    """The segment is missing, foreign, of another version or corrupt."""


def shm_dir() -> Path:
    """Where segments live: $QWEN_SERVE_SHM_DIR, else /dev/shm (shared between containers)."""
    override = os.environ.get("QWEN_SERVE_SHM_DIR")
    return Path(override) if override else Path("/dev/shm")


def _padded(n: int) -> int:
    return (n + 7) & ~7


class ShmRing:
    def __init__(self, name: str, mm: mmap.mmap, fd: int) -> None:
        self.name = name
        self._mm = mm
        self._fd = fd
        self._slots = np.frombuffer(mm, dtype=np.uint64, count=HEADER_BYTES // 8)  # [16]
        self.capacity = int(self._slots[_CAPACITY])
        self._data = np.frombuffer(mm, dtype=np.uint8, offset=HEADER_BYTES, count=self.capacity)
        # consumer's continuity check; -1 = unknown until the first record is read
        self._expected_seq = 0 if int(self._slots[_READ]) == 0 else -1

    @classmethod
    def create(cls, name: str, capacity: int) -> ShmRing:
        if capacity < 4096 or capacity % 8:
            raise ValueError(f"ring capacity must be >= 4096 and a multiple of 8, got {capacity}")
        path = shm_dir() / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, HEADER_BYTES + capacity)
            mm = mmap.mmap(fd, HEADER_BYTES + capacity)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise
        mm[0:16] = MAGIC + struct.pack("<II", VERSION, 0)
        struct.pack_into("<Q", mm, _CAPACITY * 8, capacity)
        return cls(name, mm, fd)

    @classmethod
    def attach(cls, name: str) -> ShmRing:
        path = shm_dir() / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise RingError(f"cannot open ring {path}: {exc}") from exc
        size = os.fstat(fd).st_size
        if size < HEADER_BYTES + 4096:
            os.close(fd)
            raise RingError(f"ring {path} is too small ({size} bytes)")
        mm = mmap.mmap(fd, size)
        magic, version = bytes(mm[0:8]), struct.unpack_from("<I", mm, 8)[0]
        capacity = struct.unpack_from("<Q", mm, _CAPACITY * 8)[0]
        if magic != MAGIC or version != VERSION or capacity + HEADER_BYTES != size:
            mm.close()
            os.close(fd)
            raise RingError(f"ring {path}: bad header (magic {magic!r}, version {version}, "
                            f"capacity {capacity}, file {size} bytes); expected {MAGIC!r} v{VERSION}")
        return cls(name, mm, fd)

    # --- producer side -------------------------------------------------------------------------
    def try_write(self, msg_type: int, payload: bytes) -> bool:
        """Append one record; False (nothing written) when it does not fit right now."""
        size = RECORD_HEADER.size + _padded(len(payload))
        if size > self.capacity:
            raise ValueError(f"record of {len(payload)} bytes exceeds ring capacity {self.capacity}")
        write, read = int(self._slots[_WRITE]), int(self._slots[_READ])
        if size > self.capacity - (write - read):
            return False
        seq = int(self._slots[_NEXT_SEQ])
        self._copy_in(write, RECORD_HEADER.pack(len(payload), msg_type, 0, seq))
        self._copy_in(write + RECORD_HEADER.size, payload)
        self._slots[_NEXT_SEQ] = seq + 1
        self._slots[_WRITE] = write + size          # publish after the bytes
        return True

    def free_bytes(self) -> int:
        return self.capacity - (int(self._slots[_WRITE]) - int(self._slots[_READ]))

    def set_writer_waiting(self, waiting: bool) -> None:
        self._slots[_WAITING] = 1 if waiting else 0

    def beat(self) -> None:
        """Liveness: bumped by the producer's heartbeat thread (stops when the process freezes)."""
        self._slots[_HEARTBEAT] += np.uint64(1)

    def advance(self) -> None:
        """Progress: bumped by the producer's main loop once per turn (stops when a step hangs)."""
        self._slots[_PROGRESS] += np.uint64(1)

    def mark_closed(self) -> None:
        self._slots[_CLOSED] = 1

    # --- consumer side -------------------------------------------------------------------------
    def read_all(self) -> list[tuple[int, bytes]]:
        """Every complete record available now as (msg_type, payload); frees their space."""
        records: list[tuple[int, bytes]] = []
        read, write = int(self._slots[_READ]), int(self._slots[_WRITE])
        while read < write:
            length, msg_type, _, seq = RECORD_HEADER.unpack(self._copy_out(read, RECORD_HEADER.size))
            if self._expected_seq >= 0 and seq != self._expected_seq:
                raise RingError(f"ring {self.name}: record seq {seq}, expected {self._expected_seq}")
            if RECORD_HEADER.size + _padded(length) > write - read:
                raise RingError(f"ring {self.name}: record of {length} bytes overruns the write position")
            records.append((msg_type, self._copy_out(read + RECORD_HEADER.size, length)))
            self._expected_seq = seq + 1
            read += RECORD_HEADER.size + _padded(length)
        self._slots[_READ] = read
        return records

    def writer_waiting(self) -> bool:
        return bool(self._slots[_WAITING])

    def heartbeat(self) -> int:
        return int(self._slots[_HEARTBEAT])

    def progress(self) -> int:
        return int(self._slots[_PROGRESS])

    def is_closed(self) -> bool:
        return bool(self._slots[_CLOSED])

    # --- both ----------------------------------------------------------------------------------
    def _copy_in(self, pos: int, data: bytes) -> None:
        start = pos % self.capacity
        first = min(len(data), self.capacity - start)
        src = np.frombuffer(data, dtype=np.uint8)
        self._data[start:start + first] = src[:first]
        if first < len(data):
            self._data[:len(data) - first] = src[first:]

    def _copy_out(self, pos: int, n: int) -> bytes:
        start = pos % self.capacity
        first = min(n, self.capacity - start)
        if first == n:
            return self._data[start:start + n].tobytes()
        return self._data[start:].tobytes() + self._data[:n - first].tobytes()

    def close(self) -> None:
        """Unmap (idempotent); the file stays until `unlink`."""
        if self._fd < 0:
            return
        del self._slots, self._data
        self._mm.close()
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        unlink_segment(self.name)


def unlink_segment(name: str) -> None:
    (shm_dir() / name).unlink(missing_ok=True)
