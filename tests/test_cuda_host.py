"""CPU-side checks of the CUDA backend's host code (runs in CI without a GPU): struct records that
mirror the kernels' C structs, RoPE tables equal to the reference's, sampling
packing and step-batch validation."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from gpu_worker.backends.base import SampleRequest
from gpu_worker.backends.cpu.sequence_runner import SequenceChunk, blocks_for, build_step
from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.attention import PARAMS_FIELDS as ATTENTION_FIELDS, attention_params
from gpu_worker.backends.cuda.ops.rope_kv import PARAMS_FIELDS as ROPE_FIELDS, rope_tables_host
from gpu_worker.backends.cuda.ops.sampling import SAMPLE_ARGS_DTYPE
from gpu_worker.backends.cuda.sampler import pack_sampling
from gpu_worker.backends.cuda.step_inputs import check_step_batch
from gpu_worker.model import qwen2_reference as ref
from gpu_worker.sampling.params import SamplingParams


def test_struct_records_have_the_c_layouts():
    # AttentionParams: 7 pointers + 4 int64 + 2 floats, then the decode steps' rope inputs: 9 pointers
    # + 3 int64, then the fp16 output copy's pointer; RopeKvParams: 13 pointers + 5 int64.
    assert np.dtype(ATTENTION_FIELDS, align=True).itemsize == 7 * 8 + 4 * 8 + 8 + 9 * 8 + 3 * 8 + 8
    assert np.dtype(ROPE_FIELDS, align=True).itemsize == 18 * 8
    assert SAMPLE_ARGS_DTYPE.itemsize == 88
    assert SAMPLE_ARGS_DTYPE.fields["top_p"][1] == 24 and SAMPLE_ARGS_DTYPE.fields["temperature"][1] == 40


def test_rope_tables_equal_the_reference_angles():
    cos, sin = rope_tables_host(4096, 64, 1e6)
    inv_freq = (1.0 / 1e6 ** (np.arange(0, 64, 2) / 64)).astype(np.float32)
    positions = np.array([0, 1, 17, 4095])
    ref_cos, ref_sin = ref.rope_cos_sin(positions, inv_freq)
    assert np.array_equal(cos[positions], ref_cos[:, 0]) and np.array_equal(sin[positions], ref_sin[:, 0])


def test_pack_sampling_flattens_distinct_ids_and_keeps_bias_order():
    params = SamplingParams(temperature=0.5, repetition_penalty=1.2, frequency_penalty=0.5,
                            logit_bias=((9, 1.0), (3, -2.0), (9, 0.5)), top_logprobs=2)
    req = SampleRequest(params, 3, np.array([4, 4, 7, 9], np.int32), np.array([7, 7, 9], np.int32))
    plain = SampleRequest(SamplingParams(), 0, np.array([1], np.int32), np.zeros(0, np.int32))
    packed = pack_sampling([5, 2], [req, plain], vocab=16)
    assert list(packed.bias_ids) == [9, 3, 9] and list(packed.bias_values) == [1.0, -2.0, 0.5]
    assert list(packed.seen_ids) == [4, 7, 9]            # distinct; plain has no repetition penalty
    assert list(packed.output_ids) == [7, 9] and list(packed.output_counts) == [2, 1]
    assert list(packed.args["row"]) == [5, 2] and packed.needs_penalties and packed.needs_logprobs
    assert packed.args[1]["bias_offset"] == 3 and packed.args[1]["bias_count"] == 0
    with pytest.raises(ValueError, match="vocabulary"):
        pack_sampling([0], [SampleRequest(SamplingParams(logit_bias=((99, 1.0),)), 0, np.zeros(0, np.int32),
                                          np.zeros(0, np.int32))], vocab=16)


def test_check_step_batch_names_the_bad_field():
    good = build_step([SequenceChunk((1, 2, 3), 0, blocks_for(0, 3, 16))], 16)
    check_step_batch(good, 100, 8, 16, 64, 4, 256, 16)
    with pytest.raises(ValueError, match="input_ids"):
        check_step_batch(build_step([SequenceChunk((1, 200), 0, (0,))], 16), 100, 8, 16, 64, 4, 256, 16)
    with pytest.raises(ValueError, match="positions"):
        check_step_batch(build_step([SequenceChunk((1,), 300, tuple(range(8)) * 3)], 16), 100, 8, 16, 64, 4,
                         256, 32)
    with pytest.raises(ValueError, match="exceeds"):
        check_step_batch(good, 100, 8, 16, 2, 4, 256, 16)


def test_step_batch_check_names_the_first_bad_sequence():
    chunks = [SequenceChunk((1,), 20, blocks_for(2 * i, 21, 16)) for i in range(3)]
    good = build_step(chunks, 16)
    good.check(100, 8, 16)
    tables = good.block_tables.copy()
    tables[1, 1] = 8                                    # sequence 1: a block past num_blocks
    contexts = good.context_lens.copy()
    contexts[2] = 5                                     # sequence 2: wrong context length
    with pytest.raises(ValueError, match="sequence 1: block table"):
        replace(good, block_tables=tables, context_lens=contexts).check(100, 8, 16)
    with pytest.raises(ValueError, match="sequence 2: context_lens 5"):
        replace(good, context_lens=contexts).check(100, 8, 16)
    short = good.block_tables[:, :1]                    # 21 tokens need 2 blocks of 16
    with pytest.raises(ValueError, match="sequence 0: block table does not cover 21"):
        replace(good, block_tables=short).check(100, 8, 16)


class LazyStreamCuda:
    """Stands in for pycuda.driver: async copies run only when an event is waited for (a device
    that is behind the host), reading the pinned mirror as it is then."""

    Error = RuntimeError

    def __init__(self):
        self.pending, self.device = [], {}

    def pagelocked_zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def memcpy_htod_async(self, ptr, host, stream):
        self.pending.append((ptr, host))   # a view: the copy reads it when the stream gets there

    def run_stream(self):
        for ptr, host in self.pending:
            self.device[ptr] = host.copy()
        self.pending.clear()

    def Event(self):
        cuda = self

        class Event:
            def record(self, stream):
                pass

            def synchronize(self):
                cuda.run_stream()
        return Event()


def lazy_step_inputs():
    """(LazyStreamCuda, StepMeta, StepInputs) for 8 tokens, 2 sequences, 4 blocks per sequence."""
    from types import SimpleNamespace

    from gpu_worker.backends.cuda.forward import allocate_meta
    from gpu_worker.backends.cuda.step_inputs import StepInputs

    cuda = LazyStreamCuda()
    addresses = iter(range(0x1000, 0x100000, 0x1000))
    memory = SimpleNamespace(tensor=lambda purpose, shape, dtype: DeviceTensor(next(addresses), shape, np.dtype(dtype)))
    meta = allocate_meta(memory, max_tokens=8, max_seqs=2, max_blocks_per_seq=4)
    return cuda, meta, StepInputs(SimpleNamespace(cuda=cuda, stream=None), meta, 8, 2, 4)


def test_an_upload_waits_for_the_mirrors_previous_copies():
    """Prompt-chunk steps sample nothing, so nobody waits for them: the next upload into the same
    pinned mirror must not overwrite what the previous copy has not read yet."""
    cuda, meta, inputs = lazy_step_inputs()
    first = build_step([SequenceChunk((11, 12, 13), 0, (0,))], 16)
    second = build_step([SequenceChunk((21, 22, 23), 3, (0,))], 16)
    inputs.upload(first, pad_to=None, logit_rows=np.array([2], np.int32))
    inputs.upload(second, pad_to=None, logit_rows=np.array([2], np.int32))   # waits: the first copy runs now
    copied_first = cuda.device[meta.base.ptr][:3].tolist()
    cuda.run_stream()
    assert copied_first == [11, 12, 13]
    assert cuda.device[meta.base.ptr][:3].tolist() == [21, 22, 23]


def test_eager_padding_tokens_write_no_kv_and_stay_in_sequence_0():
    """Tokens past an eager step's batch (its bucketed token count): id 0 at position 0 of sequence
    0 (a valid block-table row), slot -1 (no KV write)."""
    cuda, meta, inputs = lazy_step_inputs()
    step = build_step([SequenceChunk((11, 12), 0, (3,)), SequenceChunk((21, 22, 23), 5, (4,))], 16)
    inputs.upload(step, pad_to=None, logit_rows=np.array([1, 4], np.int32), pad_tokens_to=8)
    cuda.run_stream()
    fields = cuda.device[meta.base.ptr]
    ids, positions, slots, token_seq = (fields[8 * i:8 * i + 8].tolist() for i in range(4))
    assert ids == [11, 12, 21, 22, 23, 0, 0, 0] and positions == [0, 1, 5, 6, 7, 0, 0, 0]
    assert slots[5:] == [-1, -1, -1] and min(slots[:5]) >= 0
    assert token_seq == [0, 0, 1, 1, 1, 0, 0, 0]


def test_attention_refuses_a_cache_past_its_32_bit_offsets():
    """attention.cu addresses cache rows with 32-bit element offsets: a cache of 2^32 halves or
    more per layer is refused before launch, naming the cache."""
    def tensor(shape, dtype):
        return DeviceTensor(ptr=1 << 20, shape=shape, dtype=np.dtype(dtype))
    q = tensor((1, 14, 64), np.float32)
    ints = tensor((1,), np.int32)
    slots = 2**32 // (2 * 64)   # exactly 2^32 halves with 2 kv heads
    cache = tensor((slots, 2, 64), np.float16)
    with pytest.raises(ValueError, match="k_cache of 33554432 slots"):
        attention_params(q, q, cache, cache, tensor((1, 4), np.int32), ints, ints, 16)
    small = tensor((slots - 16, 2, 64), np.float16)
    assert attention_params(q, q, small, small, tensor((1, 4), np.int32), ints, ints, 16)["num_kv_heads"] == 2
