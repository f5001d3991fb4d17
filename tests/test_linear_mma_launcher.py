"""The linear_mma launcher's host logic without a GPU: which kernels it enqueues, with which
arguments, for the f16gemm layout (row slices, output offsets) and the reuse of x's fp16 copy.
A recording stand-in replaces the PyCUDA module; the kernels themselves are checked on the GPU
(tests/gpu/test_linear_mma.py)."""
from __future__ import annotations

import sys
import types

import pytest

from gpu_worker.backends.cuda.ops import linear_mma
from gpu_worker.backends.cuda.ops.linear_mma import LinearMmaOp
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight

X_SCRATCH, W_SCRATCH = 0x10000, 0x200000


class RecordingFunction:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def prepare(self, arg_types: str) -> None:
        self.arg_types = arg_types

    def set_attribute(self, attribute, value) -> None:
        pass

    def prepared_async_call(self, grid, block, stream, *args, shared_size: int = 0) -> None:
        assert len(args) == len(self.arg_types), (self.name, args)
        self.calls.append((self.name, grid, args))


class RecordingModule:
    def __init__(self) -> None:
        self.calls: list = []

    def get_function(self, name: str) -> RecordingFunction:
        return RecordingFunction(name, self.calls)


@pytest.fixture(autouse=True)
def fake_pycuda(monkeypatch):
    """The launcher imports pycuda.driver for the shared-memory opt-in attribute only."""
    driver = types.SimpleNamespace(function_attribute=types.SimpleNamespace(MAX_DYNAMIC_SHARED_SIZE_BYTES=8))
    package = types.ModuleType("pycuda")
    package.driver = driver
    monkeypatch.setitem(sys.modules, "pycuda", package)
    monkeypatch.setitem(sys.modules, "pycuda.driver", driver)


def launcher(weight_halves: int) -> tuple[LinearMmaOp, list]:
    module = RecordingModule()
    return LinearMmaOp(module, (X_SCRATCH, 1 << 24), (W_SCRATCH, weight_halves)), module.calls


def test_f16gemm_runs_tall_matrices_in_row_slices_with_their_own_outputs():
    lm_head = DeviceWeight(8, 1000, 896, ptr=1 << 30)          # Q8_0, 952 bytes per row
    linear, calls = launcher(weight_halves=300 * 896)           # 256 rows per slice (whole 64-row tiles)
    linear(lm_head, 0x1000, 0x8000000, 200, stream=None, tile=("f16gemm", 8))
    names = [c[0] for c in calls]
    assert names == ["f32_to_f16_slots"] + ["dequant_slots_q8_0", "linear_f16_gemm_g8"] * 4
    gemms = [c for c in calls if c[0] == "linear_f16_gemm_g8"]
    dequants = [c for c in calls if c[0] == "dequant_slots_q8_0"]
    assert [d[2][0] - lm_head.ptr for d in dequants] == [r * 952 for r in (0, 256, 512, 768)]
    assert [d[2][2] for d in dequants] == [256, 256, 256, 232]
    assert [g[2][2] - 0x8000000 for g in gemms] == [4 * r for r in (0, 256, 512, 768)]   # y + first row
    assert [g[1] for g in gemms] == [(4, 4, 1)] * 3 + [(4, 4, 1)]   # ceil(rows / 64), ceil(200 / 64)
    # no fp16 copy of y (y16 null); its row stride would be the 1000 outputs
    assert all(g[2][:2] == (W_SCRATCH, X_SCRATCH) and g[2][3:] == (g[2][3], 896, 200, 1000, 0, 1000) for g in gemms)


def test_swiglu_slices_write_half_as_many_output_columns():
    gate_up = DeviceWeight(6, 256, 512, ptr=1 << 30)
    linear, calls = launcher(weight_halves=128 * 512)
    linear(gate_up, 0x1000, 0x8000000, 128, stream=None, epilogue="swiglu", tile=("f16gemm", 8))
    gemms = [c for c in calls if c[0] == "linear_f16_gemm_swiglu_g8"]
    assert [g[2][2] - 0x8000000 for g in gemms] == [0, 4 * 64]   # slice 2 starts at gate/up pair 64
    assert all(g[2][6] == 128 for g in gemms)                    # y stride: 256 / 2 outputs per token


def test_y_stride_reaches_every_layout_and_must_cover_the_outputs():
    """The merged q/k/v launches write columns of one [tokens, 1152] buffer: rows y_stride apart."""
    qk = DeviceWeight(6, 1024, 896, ptr=1 << 30)
    linear, calls = launcher(weight_halves=1024 * 896)
    for tile in (("split_k", 1), ("rows", 4), ("gemm16", 4), ("f16gemm32", 4)):
        calls.clear()
        linear(qk, 0x1000, 0x8000000, 40, stream=None, tile=tile, y_stride=1152)
        launches = [c for c in calls if not c[0].startswith(("f32_to_f16", "dequant"))]
        stride = [c[2][6] if c[0].startswith("linear_f16") else c[2][-1] for c in launches]
        assert launches and stride == [1152] * len(launches), tile
    calls.clear()
    linear(qk, 0x1000, 0x8000000, 40, stream=None)
    assert calls[-1][2][-1] == 1024   # default: packed rows
    with pytest.raises(ValueError, match="y_stride must be >= the 1024 outputs"):
        linear(qk, 0x1000, 0x8000000, 40, stream=None, y_stride=1000)


def test_x_copy_is_reused_only_for_the_same_x_in_the_same_order():
    q, o = DeviceWeight(6, 896, 896, ptr=1 << 30), DeviceWeight(6, 896, 896, ptr=1 << 31)
    linear, calls = launcher(weight_halves=896 * 896)

    def conversions(*call_args, **kwargs) -> list[str]:
        calls.clear()
        linear(*call_args, stream=None, **kwargs)
        return [c[0] for c in calls if c[0].startswith("f32_to_f16")]

    assert conversions(q, 0x1000, 0x9000, 256) == ["f32_to_f16_slots"]
    assert conversions(o, 0x1000, 0xa000, 256, x_unchanged=True) == []
    assert conversions(o, 0x1000, 0xa000, 256) == ["f32_to_f16_slots"]            # not promised: converted
    assert conversions(o, 0x2000, 0xa000, 256, x_unchanged=True) == ["f32_to_f16_slots"]   # another x
    assert conversions(o, 0x2000, 0xa000, 200, x_unchanged=True) == ["f32_to_f16_slots"]   # other tokens
    assert conversions(o, 0x2000, 0xa000, 200, tile=("gemm32", 8), x_unchanged=True) == ["f32_to_f16"]
    assert conversions(o, 0x2000, 0xa000, 200, tile=("f16gemm", 8), x_unchanged=True) == ["f32_to_f16_slots"]
    # a call in between that reads x directly (split-K): the promise covers only that call, so the copy
    # made before it is not trusted
    conversions(q, 0x2000, 0x9000, 200, tile=("split_k", 2))
    assert conversions(o, 0x2000, 0xa000, 200, tile=("f16gemm", 8), x_unchanged=True) == ["f32_to_f16_slots"]


def test_a_producer_written_copy_replaces_the_conversion_for_the_next_call_only():
    """note_x16: rms_norm / attention wrote x's fp16 copy themselves, at an address of their own."""
    o = DeviceWeight(6, 896, 896, ptr=1 << 31)
    linear, calls = launcher(weight_halves=896 * 896)
    assert linear.wants_x16(o, 256) and not linear.wants_x16(o, 8)   # f16gemm32 from 32 tokens, split-K at 8
    linear.note_x16(0x1000, 256, 896, 0x700000)
    linear(o, 0x1000, 0xa000, 256, stream=None)
    assert [c[0] for c in calls] == ["dequant_slots_q5_0", "linear_f16_gemm32_g4"]   # no conversion
    assert calls[-1][2][1] == 0x700000                                               # the noted copy is read
    calls.clear()
    linear(o, 0x1000, 0xa000, 256, stream=None, x_unchanged=True)                     # still that copy
    assert [c[0] for c in calls] == ["dequant_slots_q5_0", "linear_f16_gemm32_g4"] and calls[-1][2][1] == 0x700000
    calls.clear()
    linear.note_x16(0x1000, 256, 896, 0x700000)
    linear(o, 0x2000, 0xa000, 256, stream=None)            # another x: the note is not about it
    linear(o, 0x1000, 0xa000, 256, stream=None)            # and it was good for one call only
    assert [c[0] for c in calls].count("f32_to_f16_slots") == 2 and calls[-1][2][1] == X_SCRATCH
    # a note at the address of the copy the launcher holds means that copy was overwritten
    linear.note_x16(0x3000, 256, 896, X_SCRATCH)
    calls.clear()
    linear(o, 0x1000, 0xa000, 256, stream=None, x_unchanged=True)
    assert calls[0][0] == "f32_to_f16_slots"


def test_swiglu_writes_the_down_projections_copy_and_notes_it():
    gate_up, down = DeviceWeight(6, 9728, 896, ptr=1 << 30), DeviceWeight(14, 896, 4864, ptr=1 << 31)
    linear, calls = launcher(weight_halves=9728 * 896)
    linear(gate_up, 0x1000, 0x8000000, 256, stream=None, epilogue="swiglu", y16_ptr=0x900000)
    name, _, args = calls[-1]
    assert name == "linear_f16_gemm_swiglu_g8" and args[-2:] == (0x900000, 4864)
    calls.clear()
    linear(down, 0x8000000, 0xb000, 256, stream=None, epilogue="accumulate")
    assert [c[0] for c in calls] == ["dequant_slots_q6_k", "linear_f16_gemm32_acc_g4"] and calls[-1][2][1] == 0x900000
    # not where the layout has no fp16 output (split-K at 8 tokens), nor for packed-column writes
    calls.clear()
    linear(gate_up, 0x1000, 0x8000000, 8, stream=None, epilogue="swiglu", y16_ptr=0x900000)
    linear(down, 0x8000000, 0xb000, 8, stream=None, epilogue="accumulate")
    assert not any(c[0].startswith("linear_f16") for c in calls)
    with pytest.raises(ValueError, match="must not be the buffer"):
        linear(gate_up, 0x1000, 0x8000000, 256, stream=None, epilogue="swiglu", y16_ptr=X_SCRATCH)


def test_weight_scratch_holds_the_largest_layer_matrix_or_16384_lm_head_rows():
    from types import SimpleNamespace

    from gpu_worker.backends.cuda.forward import weight_scratch_halves

    def weights(vocab: int) -> SimpleNamespace:
        w = lambda rows, cols: DeviceWeight(6, rows, cols, ptr=1 << 30)
        layer = SimpleNamespace(qkv_runs=(w(1152, 896),), o=w(896, 896), gate=None, up=None,
                                down=w(896, 4864), gate_up=w(9728, 896))
        return SimpleNamespace(layers=(layer, layer), lm_head=w(vocab, 896))

    assert weight_scratch_halves(weights(151936)) == 16384 * 896   # the real shapes: LM head slices of 16384 rows
    assert weight_scratch_halves(weights(8000)) == 9728 * 896      # a small vocabulary: gate/up is the largest


def test_norm_prologue_kernels_only_on_decode_tiles_that_stage_the_whole_k():
    q = DeviceWeight(6, 1024, 896, ptr=1 << 30)       # Q5_0
    gate_up = DeviceWeight(6, 9728, 896, ptr=1 << 30)
    assert linear_mma.plan_linear(q, 1, "store", ("split_k", 1), norm=True).kernel_name == "linear_mma_norm_q5_0_g1"
    assert linear_mma.plan_linear(gate_up, 16, "swiglu", ("split_k", 1), norm=True).kernel_name == \
        "linear_mma_norm_swiglu_q5_0_g1"
    assert linear_mma.plan_linear(q, 8, "store", ("narrow", 2), norm=True).kernel_name == "linear_mma_narrow_norm_q5_0_g2"
    for tile, epilogue in ((("rows", 1), "store"), (("gemm16", 4), "store"), (("split_k", 2), "store"),
                           (("split_k", 1), "accumulate")):
        with pytest.raises(ValueError, match="RMSNorm prologue only"):
            linear_mma.plan_linear(q, 8, epilogue, tile, norm=True)
    long_k = DeviceWeight(14, 896, 32768, ptr=1 << 30)   # Q6_K rows too wide for one stage
    with pytest.raises(ValueError, match="whole K"):
        linear_mma.plan_linear(long_k, 1, "store", ("split_k", 1), norm=True)
    linear, calls = launcher(weight_halves=1 << 20)
    assert linear.can_norm(q, 1) and linear.can_norm(gate_up, 8, "swiglu") and not linear.can_norm(q, 512)
    assert not linear.can_norm(gate_up, 16, "swiglu")   # split_k with 16-token tiles there: no norm kernel
    linear(q, 0x1000, 0x8000000, 1, stream=None, norm=(0x4000, 1e-6))
    name, _, args = calls[-1]
    assert name == "linear_mma_norm_q5_0_g1" and args[-2:] == (0x4000, pytest.approx(1e-6))


def test_norm_prologue_plans_shared_memory_for_the_staged_gain():
    q = DeviceWeight(6, 1024, 896, ptr=1 << 30)       # Q5_0
    plain = linear_mma.plan_linear(q, 1, "store", ("split_k", 1))
    normed = linear_mma.plan_linear(q, 1, "store", ("split_k", 1), norm=True)
    assert normed.shared_bytes == plain.shared_bytes + 4 * q.cols


def test_decode_steps_stage_a_long_k_in_two_chunks():
    down = DeviceWeight(14, 896, 4864, ptr=1 << 30)   # Q6_K, 256-column blocks
    for tokens in (1, 2):
        plan = linear_mma.plan_linear(down, tokens, "accumulate")
        assert plan.chunk_cols == 2560                  # 10 of the 19 256-column units, then 9
        assert plan.shared_bytes >= 2 * linear_mma.stage_bytes(down, 2560, 8, plan.x_rows)
    # 8 tokens: the whole K does not fit one stage, so the widest chunks that fit the budget, as before
    assert linear_mma.plan_linear(down, 8, "accumulate").chunk_cols == linear_mma.plan_k_chunks(down, 8, 8)
    o = DeviceWeight(6, 896, 896, ptr=1 << 30)
    assert linear_mma.plan_linear(o, 1, "accumulate").chunk_cols == 896        # short K: one stage
