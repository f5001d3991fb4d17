"""Shared-memory rings and message encoding: wrap-around, back-pressure, versioned header,
permissions, a producer in another process, typed message round trips."""
from __future__ import annotations

import multiprocessing as mp
import os
import stat
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpu_worker.backends.base import TokenLogprobs
from gpu_worker.engine.engine import FinishOut, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.ipc import channel, messages
from gpu_worker.ipc.ring import RingError, ShmRing, shm_dir
from gpu_worker.sampling.params import SamplingParams, StoppingParams


@pytest.fixture()
def ring_name():
    name = f"qwen-serve-test-{uuid.uuid4().hex[:12]}"
    yield name
    (shm_dir() / name).unlink(missing_ok=True)


def payload_for(i: int) -> bytes:
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, size=int(rng.integers(0, 700)), dtype=np.uint8).tobytes()


def test_wrap_around_keeps_every_record_in_order(ring_name: str) -> None:
    producer = ShmRing.create(ring_name, 4096)
    consumer = ShmRing.attach(ring_name)
    sent, received = 0, []
    while sent < 400:                      # ~120 KiB through a 4 KiB ring: ~30 wraps
        while sent < 400 and producer.try_write(5, payload_for(sent)):
            sent += 1
        received += consumer.read_all()
    received += consumer.read_all()
    assert [p for _, p in received] == [payload_for(i) for i in range(400)]
    assert {t for t, _ in received} == {5}
    producer.close(), consumer.close()


def test_full_ring_refuses_then_accepts_after_read_nothing_lost(ring_name: str) -> None:
    ring = ShmRing.create(ring_name, 4096)
    n = 0
    while ring.try_write(1, bytes([n % 256]) * 100):
        n += 1
    assert n == 4096 // (16 + 104)                      # record header 16 + payload padded to 104
    assert not ring.try_write(1, b"x")                 # back-pressure, not overwrite
    got = ring.read_all()
    assert [p for _, p in got] == [bytes([i % 256]) * 100 for i in range(n)]
    assert ring.try_write(1, b"after")
    assert ring.read_all() == [(1, b"after")]
    with pytest.raises(ValueError, match="exceeds ring capacity"):
        ring.try_write(1, b"y" * 5000)
    ring.close()


def test_attach_rejects_foreign_or_other_version_segments(ring_name: str) -> None:
    ring = ShmRing.create(ring_name, 4096)
    ring.close()
    with open(shm_dir() / ring_name, "r+b") as f:
        f.seek(8)
        f.write((99).to_bytes(4, "little"))            # version 99
    with pytest.raises(RingError, match="bad header"):
        ShmRing.attach(ring_name)
    with pytest.raises(RingError, match="cannot open"):
        ShmRing.attach(ring_name + "-missing")


def test_corrupt_sequence_number_is_detected(ring_name: str) -> None:
    ring = ShmRing.create(ring_name, 4096)
    ring.try_write(1, b"a")
    ring.try_write(1, b"b")
    with open(shm_dir() / ring_name, "r+b") as f:
        f.seek(128 + 8 + 24)                           # second record's seq field
        f.write((7).to_bytes(8, "little"))
    with pytest.raises(RingError, match="seq 7, expected 1"):
        ring.read_all()
    ring.close()


def test_segment_and_socket_dir_are_owner_only(ring_name: str, tmp_path) -> None:
    ShmRing.create(ring_name, 4096).close()
    assert stat.S_IMODE(os.stat(shm_dir() / ring_name).st_mode) == 0o600
    d = tmp_path / "sock"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    channel.prepare_socket_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def _produce(name: str, count: int) -> None:
    ring = ShmRing.attach(name)
    i = 0
    while i < count:
        if ring.try_write(2, payload_for(i)):
            i += 1
    ring.close()


def test_producer_in_another_process(ring_name: str) -> None:
    ring = ShmRing.create(ring_name, 8192)
    proc = mp.get_context("spawn").Process(target=_produce, args=(ring_name, 300))
    proc.start()
    got: list[bytes] = []
    while len(got) < 300:
        got += [p for _, p in ring.read_all()]
    proc.join(30)
    assert proc.exitcode == 0
    assert got == [payload_for(i) for i in range(300)]
    ring.close()


@settings(max_examples=40, deadline=None)
@given(prompt=st.lists(st.integers(0, 151935), min_size=1, max_size=50),
       temperature=st.floats(0, 2), top_k=st.integers(0, 1000), seed=st.integers(0, 2**64 - 1),
       bias=st.lists(st.tuples(st.integers(0, 100), st.floats(-100, 100)), max_size=4),
       stops=st.lists(st.integers(0, 1000), max_size=4), max_tokens=st.integers(1, 4096),
       logprobs=st.booleans(), top_logprobs=st.integers(0, 20), ignore_eos=st.booleans())
def test_submit_round_trip(prompt, temperature, top_k, seed, bias, stops, max_tokens, logprobs,
                           top_logprobs, ignore_eos) -> None:
    spec = RequestSpec(2**63 + 5, tuple(prompt),
                       SamplingParams(temperature=temperature, top_k=top_k, top_p=0.9, min_p=0.05,
                                      repetition_penalty=1.1, presence_penalty=-0.5, frequency_penalty=0.25,
                                      seed=seed, logit_bias=tuple(bias), logprobs=logprobs,
                                      top_logprobs=top_logprobs),
                       StoppingParams(max_tokens=max_tokens, stop_token_ids=tuple(stops),
                                      ignore_eos=ignore_eos, eos_token_ids=(151645, 151643)))
    assert messages.decode_submit(messages.encode_submit(spec)) == spec


def test_submit_with_wrong_length_is_rejected() -> None:
    spec = RequestSpec(1, (1, 2, 3), SamplingParams(), StoppingParams())
    with pytest.raises(ValueError, match="counts say"):
        messages.decode_submit(messages.encode_submit(spec)[:-4])


def test_tokens_and_finished_round_trip() -> None:
    tokens = [TokenOut(3, 42, None),
              TokenOut(2**64 - 2, 7, TokenLogprobs(7, -0.25, ((7, -0.25), (9, -1.5)))),
              TokenOut(5, 0, TokenLogprobs(0, -3.0, ())),
              TokenOut(6, 151935, None)]
    assert messages.decode_tokens(messages.encode_tokens(tokens)) == tokens
    plain = [t for t in tokens if t.logprobs is None]          # the encoder's no-logprobs path
    assert messages.decode_tokens(messages.encode_tokens(plain)) == plain
    assert messages.decode_tokens(messages.encode_tokens([])) == []
    fin = FinishOut(9, "cancelled", 12, 3, 1000, 2000, 3000, "why: é")
    assert messages.decode_finished(messages.encode_finished(fin)) == fin
