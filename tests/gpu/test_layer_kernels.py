"""GPU checks of rms_norm, swiglu and rope_kv against numpy (the qwen2_reference formulas), on fresh
random inputs with poisoned outputs; row-wise results checked bitwise for batch invariance."""
from __future__ import annotations

import numpy as np
import pytest

from gpu_worker.backends.cuda.ops.rms_norm import launch_rms_norm
from gpu_worker.backends.cuda.ops.rope_kv import QkvRows, RopeTables, launch_rope_kv, rope_tables_host
from gpu_worker.backends.cuda.ops.swiglu import launch_swiglu
from gpu_worker.model import qwen2_reference as ref

from slot_order import assert_same_halves, slot_order_f16

pytestmark = pytest.mark.gpu
HIDDEN, EPS = 896, 1e-6


def rel_error(out, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.linalg.norm(np.asarray(out, np.float64) - expected) / np.linalg.norm(expected))


def test_rms_norm_fused_residual_matches_numpy_and_is_row_invariant(gpu):
    rng = np.random.default_rng()
    residual = rng.standard_normal((37, HIDDEN), dtype=np.float32) * 3
    delta = rng.standard_normal((37, HIDDEN), dtype=np.float32)
    weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    res_d, delta_d, w_d = gpu.upload(residual), gpu.upload(delta), gpu.upload(weight)
    out_d = gpu.poisoned((37, HIDDEN), np.float32)
    launch_rms_norm(gpu.device, res_d, w_d, out_d, EPS, delta=delta_d, write_residual=True)
    out, new_residual = gpu.download(out_d), gpu.download(res_d)
    assert np.array_equal(new_residual, residual + delta)  # one IEEE add, same as numpy
    expected = ref.rms_norm((residual + delta).astype(np.float64), weight.astype(np.float64), EPS)
    assert not np.isnan(out).any()
    assert rel_error(out, expected) < 1e-6
    # The same rows alone (row_ids gather, one-row launches) give the same bits.
    rows = np.array([36, 0, 17], np.int32)
    gathered = gpu.poisoned((3, HIDDEN), np.float32)
    launch_rms_norm(gpu.device, res_d, w_d, gathered, EPS, row_ids=gpu.upload(rows))
    assert np.array_equal(gpu.download(gathered), out[rows])
    single_res = gpu.upload(residual[17:18] + delta[17:18])
    single = gpu.poisoned((1, HIDDEN), np.float32)
    launch_rms_norm(gpu.device, single_res, w_d, single, EPS)
    assert np.array_equal(gpu.download(single)[0], out[17])


def test_rms_norm_writes_the_fp16_slot_copy_of_its_output(gpu):
    """out16: the next linear layer's operand, bitwise what f32_to_f16_slots would make of out."""
    rng = np.random.default_rng()
    residual = rng.standard_normal((19, HIDDEN), dtype=np.float32) * 3
    weight = (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    out_d, out16 = gpu.poisoned((19, HIDDEN), np.float32), gpu.poisoned((19, HIDDEN), np.float16)
    launch_rms_norm(gpu.device, gpu.upload(residual), gpu.upload(weight), out_d, EPS, out16=out16)
    out = gpu.download(out_d)
    assert not np.isnan(out).any()
    assert_same_halves(gpu.download(out16), slot_order_f16(out), "rms_norm's fp16 copy")
    with pytest.raises(ValueError, match="out16"):
        launch_rms_norm(gpu.device, gpu.upload(residual), gpu.upload(weight), out_d, EPS,
                        out16=gpu.poisoned((19, HIDDEN), np.float32))


def test_rms_norm_rejects_bad_shapes(gpu):
    res = gpu.upload(np.ones((4, HIDDEN), np.float32))
    with pytest.raises(ValueError, match="weight"):
        launch_rms_norm(gpu.device, res, gpu.upload(np.ones(HIDDEN - 8, np.float32)), res, EPS)
    with pytest.raises(ValueError, match="out"):
        launch_rms_norm(gpu.device, res, gpu.upload(np.ones(HIDDEN, np.float32)),
                        gpu.upload(np.ones((3, HIDDEN), np.float32)), EPS)


def test_swiglu_matches_numpy(gpu):
    rng = np.random.default_rng()
    gate = rng.standard_normal((19, 4864), dtype=np.float32) * 4
    up = rng.standard_normal((19, 4864), dtype=np.float32)
    out_d = gpu.poisoned(gate.shape, np.float32)
    launch_swiglu(gpu.device, gpu.upload(gate), gpu.upload(up), out_d)
    expected = ref.silu(gate.astype(np.float64)) * up
    out = gpu.download(out_d)
    assert not np.isnan(out).any() and rel_error(out, expected) < 1e-6


def test_rope_kv_matches_reference_and_writes_only_its_slots(gpu):
    """Inputs read as columns of one [tokens, q | k | v | spare] buffer (the merged q/k/v launches'
    layout, with a spare column so no stride equals a width), and in place as three packed buffers."""
    rng = np.random.default_rng()
    num_tokens, heads, kv_heads, dim, num_slots = 23, 14, 2, 64, 512
    q = rng.standard_normal((num_tokens, heads, dim), dtype=np.float32)
    k = rng.standard_normal((num_tokens, kv_heads, dim), dtype=np.float32)
    v = rng.standard_normal((num_tokens, kv_heads, dim), dtype=np.float32)
    biases = [rng.standard_normal(n * dim, dtype=np.float32) for n in (heads, kv_heads, kv_heads)]
    positions = rng.integers(0, 32768, num_tokens).astype(np.int32)
    slots = rng.permutation(num_slots)[:num_tokens].astype(np.int32)
    slots[5] = -1  # a padding row: no KV write
    cos, sin = rope_tables_host(32768, dim, 1e6)
    tables = RopeTables(gpu.upload(cos), gpu.upload(sin))
    inv_freq = (1.0 / 1e6 ** (np.arange(0, dim, 2) / dim)).astype(np.float32)
    c, s = ref.rope_cos_sin(positions, inv_freq)
    q_ref = ref.apply_rope(q + biases[0].reshape(heads, dim), c, s)
    k_ref = ref.apply_rope(k + biases[1].reshape(kv_heads, dim), c, s)
    v_ref = v + biases[2].reshape(kv_heads, dim)
    q_width, kv_width = heads * dim, kv_heads * dim
    qkv = np.concatenate([q.reshape(num_tokens, -1), k.reshape(num_tokens, -1), v.reshape(num_tokens, -1),
                          rng.standard_normal((num_tokens, 1), dtype=np.float32)], axis=1)
    qkv_d = gpu.upload(qkv)
    q_out = gpu.poisoned((num_tokens, heads, dim), np.float32)
    stride = qkv.shape[1]
    merged = QkvRows(q_in=qkv_d.ptr, k_in=qkv_d.ptr + 4 * q_width, v_in=qkv_d.ptr + 4 * (q_width + kv_width),
                     q_in_stride=stride, kv_in_stride=stride, q_out=q_out)
    q_d = gpu.upload(q)
    packed = QkvRows(q_in=q_d.ptr, k_in=gpu.upload(k).ptr, v_in=gpu.upload(v).ptr, q_in_stride=q_width,
                     kv_in_stride=kv_width, q_out=q_d)
    outputs = []
    for rows in (merged, packed):
        k_cache = gpu.poisoned((num_slots, kv_heads, dim), np.float16)
        v_cache = gpu.poisoned((num_slots, kv_heads, dim), np.float16)
        launch_rope_kv(gpu.device, rows, tuple(gpu.upload(b) for b in biases), gpu.upload(positions),
                       gpu.upload(slots), tables, k_cache, v_cache)
        outputs.append((gpu.download(rows.q_out), gpu.download(k_cache), gpu.download(v_cache)))
    assert np.array_equal(gpu.download(qkv_d), qkv), "rope_kv wrote into its merged input"
    for n in range(3):
        np.testing.assert_array_equal(outputs[0][n], outputs[1][n])
    q_out, k_out, v_out = outputs[0]
    assert rel_error(q_out, q_ref) < 1e-6
    written = slots >= 0
    assert np.allclose(k_out[slots[written]], k_ref[written].astype(np.float16), rtol=2e-3, atol=1e-3)
    assert np.array_equal(v_out[slots[written]], v_ref[written].astype(np.float16))
    untouched = np.setdiff1d(np.arange(num_slots), slots[written])
    assert np.isnan(k_out[untouched]).all() and np.isnan(v_out[untouched]).all()
