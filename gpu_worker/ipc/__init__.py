"""Shared-memory IPC between the front-end and the worker.

ring.py        SPSC byte ring in /dev/shm (versioned header, length + seq record headers)
messages.py    typed message encoding (struct + numpy arrays)
channel.py     Unix socket: socket dir (0700), handshake, wake-up bytes, segment names
worker_endpoint.py   the worker's loop around the engine
client_endpoint.py   the front-end's connection (used by server.worker_client)
"""
