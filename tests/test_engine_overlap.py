"""Overlapped decode steps (engine.py): with a backend that takes a decode step's input ids from
the previous step's samples, the engine submits step N + 1 before reading step N. Every token,
logprob and finish must be those of the synchronous engine, through EOS and stop ids, aborts,
length limits, preemption and penalties (which turn the overlap off)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gpu_worker.backends.base import StepBatch, StepOutput
from gpu_worker.backends.cpu.backend import CpuBackend
from gpu_worker.engine.engine import Engine, FinishOut, TokenOut
from gpu_worker.engine.sequence import RequestSpec
from gpu_worker.sampling.params import SamplingParams, StoppingParams
from gpu_worker.worker_main import create_engine


class OverlapCpuBackend(CpuBackend):
    """The numpy backend with the overlap contract of Backend.submit: a step with previous_rows
    takes its input ids from the previous submitted step's samples (what the cuda backend copies
    on the device). It checks the contract's preconditions as it goes."""

    supports_overlap = True

    def __init__(self, model) -> None:
        super().__init__(model)
        self.previous_tokens: np.ndarray | None = None
        self.previous_was_decode = False
        self.num_from_previous = 0
        self.num_gathered = 0           # steps ahead whose rows skip finished sequences

    def submit(self, batch: StepBatch, previous_rows: np.ndarray | None = None) -> object:
        if previous_rows is not None:
            assert self.previous_was_decode and self.previous_tokens is not None
            assert len(previous_rows) == batch.num_seqs == batch.num_tokens
            assert (self.previous_tokens >= 0).all(), "the previous step must sample every row"
            batch = dataclasses.replace(batch, input_ids=self.previous_tokens[previous_rows].astype(np.int32))
            self.num_from_previous += 1
            self.num_gathered += int(not np.array_equal(previous_rows, np.arange(batch.num_seqs)))
        output = self.step(batch)
        self.previous_tokens = output.token_ids.copy()
        self.previous_was_decode = batch.num_tokens == batch.num_seqs
        return output

    def collect(self, handle: object) -> StepOutput:
        assert isinstance(handle, StepOutput)
        return handle


@pytest.fixture
def model(small_vocab_model):
    """The shared tiny model with the 269-token byte vocabulary (conftest.py)."""
    return small_vocab_model


def make(model, overlap: bool, num_blocks: int = 160, max_batch: int = 32) -> Engine:
    backend = OverlapCpuBackend(model) if overlap else CpuBackend(model)
    return create_engine(model, backend, num_blocks, 4, max_batch, 64)


def spec(key: int, max_tokens: int, seed: int, **options) -> RequestSpec:
    penalties = options.pop("penalties", False)
    sampling = SamplingParams(temperature=0.0 if seed % 3 == 0 else 0.8, top_k=0 if seed % 2 else 20, seed=seed,
                              logprobs=seed % 4 == 1, top_logprobs=seed % 3,
                              repetition_penalty=1.3 if penalties else 1.0)
    prompt = tuple((key * 31 + i * 7) % 250 + 1 for i in range(3 + key % 9))
    return RequestSpec(key, prompt, sampling, StoppingParams(max_tokens=max_tokens, **options))


def run(engine: Engine, specs: list[RequestSpec], abort_at: dict[int, int] | None = None,
        add_at: dict[int, list[RequestSpec]] | None = None):
    """Tokens per key and (reason, completion tokens) per key; aborts and late adds between steps."""
    tokens: dict[int, list[TokenOut]] = {}
    finished: dict[int, tuple[str, int]] = {}

    def record(events) -> None:
        for event in events:
            if isinstance(event, TokenOut):
                assert event.request_key not in finished, "a token after the finish"
                tokens.setdefault(event.request_key, []).append(event)
            else:
                assert isinstance(event, FinishOut)
                finished[event.request_key] = (event.reason, event.completion_tokens)

    for s in specs:
        record(engine.add_request(s))
    step = 0
    while engine.has_work or (add_at and any(k >= step for k in add_at)):
        for s in (add_at or {}).get(step, []):
            record(engine.add_request(s))
        for key, at in (abort_at or {}).items():
            if at == step:
                record(engine.abort(key))
        record(engine.step())
        engine.check_invariants()
        step += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return tokens, finished


def test_overlapped_decode_equals_the_synchronous_engine(model) -> None:
    specs = [spec(k, max_tokens=5 + 3 * k, seed=k, ignore_eos=True) for k in range(12)]
    specs += [spec(20, max_tokens=40, seed=5)]                    # may stop at EOS
    reference = run(make(model, overlap=False), specs)
    engine = make(model, overlap=True)
    assert run(engine, specs) == reference
    assert engine.num_overlapped_steps > 10 and engine.backend.num_from_previous == engine.num_overlapped_steps
    assert engine.backend.num_gathered > 0      # steps ahead went on past sequences that finished


def test_stop_ids_aborts_and_late_requests_between_overlapped_steps(model) -> None:
    probe, _ = run(make(model, overlap=False), [spec(1, max_tokens=30, seed=3, ignore_eos=True)])
    ids = [t.token_id for t in probe[1]]
    stop = next(ids[i] for i in range(6, 30) if ids[i] not in ids[:i])
    specs = [spec(1, max_tokens=30, seed=3, ignore_eos=True, stop_token_ids=(stop,))]
    specs += [spec(k, max_tokens=25, seed=k, ignore_eos=True) for k in range(2, 8)]
    late = {9: [spec(30, max_tokens=12, seed=6, ignore_eos=True)], 14: [spec(31, max_tokens=3, seed=9)]}
    aborts = {4: 7, 5: 11}                                       # key: step
    reference = run(make(model, overlap=False), specs, abort_at=aborts, add_at=late)
    engine = make(model, overlap=True)
    assert run(engine, specs, abort_at=aborts, add_at=late) == reference
    assert reference[1][4][0] == reference[1][5][0] == "cancelled" and reference[1][1][0] == "stop"
    assert engine.num_overlapped_steps > 5


def test_preemption_and_penalties_fall_back_to_synchronous_steps(model) -> None:
    specs = [spec(k, max_tokens=20, seed=k, ignore_eos=True) for k in range(6)]
    specs += [spec(6, max_tokens=20, seed=8, ignore_eos=True, penalties=True)]
    reference = run(make(model, overlap=False, num_blocks=14), specs)
    tight = make(model, overlap=True, num_blocks=14)             # 56 slots for 7 sequences of ~30
    assert run(tight, specs) == reference
    assert tight.num_preemptions > 0
    penalized_only = [spec(6, max_tokens=10, seed=8, ignore_eos=True, penalties=True)]
    engine = make(model, overlap=True)
    assert run(engine, penalized_only) == run(make(model, overlap=False), penalized_only)
    assert engine.num_overlapped_steps == 0


class FailingAheadBackend(OverlapCpuBackend):
    """Refuses the `fail_at`-th step submitted ahead (as a device error would)."""

    def __init__(self, model, fail_at: int) -> None:
        super().__init__(model)
        self.fail_at, self.ahead = fail_at, 0

    def submit(self, batch: StepBatch, previous_rows: np.ndarray | None = None) -> object:
        if previous_rows is not None:
            self.ahead += 1
            if self.ahead == self.fail_at:
                raise RuntimeError("device error (test)")
        return super().submit(batch, previous_rows)


def test_a_step_ahead_that_fails_fails_its_requests_after_the_current_tokens(model) -> None:
    specs = [spec(k, max_tokens=20, seed=k, ignore_eos=True) for k in range(4)]
    reference, _ = run(make(model, overlap=False), specs)
    engine = create_engine(model, FailingAheadBackend(model, fail_at=3), 160, 4, 32, 64)
    tokens, finished = run(engine, specs)
    assert all(reason == "error" for reason, _ in finished.values())
    # The prompt step, one synchronous decode step and the two steps ahead that started give 4
    # tokens each, the reference's; the third step ahead fails after them.
    for key, got in tokens.items():
        assert got == reference[key][:4]
        assert finished[key] == ("error", 4)
    after = [spec(9, max_tokens=6, seed=2, ignore_eos=True)]   # the engine keeps serving
    assert run(engine, after) == run(make(model, overlap=False), after)
