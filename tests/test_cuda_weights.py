"""The CUDA backend's weight layout, without a GPU: what upload_weights puts where (a fake device
records the bytes), and the q/k/v runs that the forward launches as one matrix each."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as QType

from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.backends.cuda.weights import qkv_offsets, same_type_runs, stored_tensor_bytes, upload_weights
from gpu_worker.model.dequant import as_q8_0, dequantize, dequantize_blocks
from gpu_worker.model.gguf_loader import load_gguf
from gpu_worker.model.synthetic import write_synthetic_gguf

BASE = 1 << 20   # the fake allocation's device address


class FakeDevice:
    """memory.allocate + cuda.memcpy_htod into a host bytearray standing for device memory."""

    def __init__(self) -> None:
        self.bytes = bytearray()
        self.memory, self.cuda = self, self

    def allocate(self, purpose: str, nbytes: int) -> int:
        assert purpose == "weights" and not self.bytes
        self.bytes = bytearray(b"\xff" * nbytes)
        return BASE

    def memcpy_htod(self, ptr: int, host: np.ndarray) -> None:
        data = np.ascontiguousarray(host).view(np.uint8).reshape(-1)
        self.bytes[ptr - BASE:ptr - BASE + data.nbytes] = data.tobytes()

    def read(self, weight: DeviceWeight) -> bytes:
        return bytes(self.bytes[weight.ptr - BASE:weight.ptr - BASE + weight.nbytes])


def test_qkv_sits_back_to_back_and_merges_by_type(tmp_path):
    # layer 0: q, k, v all Q5_0 (one run); layer 1: v in Q8_0, as in the default model: q and k are
    # stored as Q8_0 too (the same values), so that layer is one run as well; layer 2: v in Q4_1
    # (no exact common encoding): runs q+k, v
    types = {f"blk.{i}.attn_{m}.weight": QType.Q5_0 for i in (0, 1, 2) for m in "qkv"}
    types["blk.1.attn_v.weight"] = QType.Q8_0
    types["blk.2.attn_v.weight"] = QType.Q4_1
    path = tmp_path / "mixed.gguf"
    write_synthetic_gguf(path, weight_type=types, num_layers=3, seed=3)
    model = load_gguf(path)
    device = FakeDevice()
    weights = upload_weights(device, model, interleave_gate_up=True)
    for i, layer in enumerate(weights.layers):
        for name, weight in (("q", layer.q), ("k", layer.k), ("v", layer.v)):
            tensor = model.tensors[f"blk.{i}.attn_{name}.weight"]
            if i == 1 and name != "v":   # re-encoded: the same values, bit for bit
                assert weight.qtype == int(QType.Q8_0)
                stored = dequantize_blocks(QType.Q8_0, np.frombuffer(device.read(weight), np.uint8))
                assert np.array_equal(stored.view(np.uint32), dequantize(tensor).reshape(-1).view(np.uint32))
            else:
                assert device.read(weight) == tensor.data.tobytes(), (i, name)
        assert layer.k.ptr == layer.q.ptr + layer.q.nbytes and layer.v.ptr == layer.k.ptr + layer.k.nbytes
    runs0, runs1, runs2 = (layer.qkv_runs for layer in weights.layers)
    q = weights.layers[0].q
    assert runs0 == (DeviceWeight(int(QType.Q5_0), q.rows + 2 * weights.layers[0].k.rows, q.cols, q.ptr),)
    assert runs1 == (DeviceWeight(int(QType.Q8_0), q.rows + 2 * weights.layers[1].k.rows, q.cols,
                                  weights.layers[1].q.ptr),)
    assert [(r.qtype, r.rows, r.ptr) for r in runs2] == [
        (int(QType.Q5_0), weights.layers[2].q.rows + weights.layers[2].k.rows, weights.layers[2].q.ptr),
        (int(QType.Q4_1), weights.layers[2].v.rows, weights.layers[2].v.ptr)]
    assert device.read(runs0[0]) == b"".join(model.tensors[f"blk.0.attn_{m}.weight"].data.tobytes() for m in "qkv")
    # layer 1's q and k grew from 22 to 34 bytes per 32 values
    growth = (weights.layers[1].q.rows + weights.layers[1].k.rows) * q.cols // 32 * (34 - 22)
    assert stored_tensor_bytes(model) == sum(t.nbytes for t in model.tensors.values()) + growth
    assert stored_tensor_bytes(model) <= weights.nbytes <= stored_tensor_bytes(model) + 256 * len(model.tensors)


def test_q4_0_and_q5_0_blocks_become_q8_0_blocks_of_the_same_values():
    """dequant.as_q8_0: the same d, the integers q - bias; extremes of q included."""
    rng = np.random.default_rng(7)
    for qtype, block_bytes in ((QType.Q4_0, 18), (QType.Q5_0, 22)):
        raw = rng.integers(0, 256, (64, block_bytes), dtype=np.uint8)
        raw[:, :2] = np.frombuffer(rng.standard_normal(64).astype(np.float16).tobytes(), np.uint8).reshape(64, 2)
        raw[0, 2:] = 0x00   # q = 0 everywhere (the most negative value)
        raw[1, 2:] = 0xFF   # q at its maximum
        q8 = as_q8_0(qtype, raw)
        assert q8.size == 64 * 34
        expected = dequantize_blocks(qtype, raw)
        assert np.array_equal(dequantize_blocks(QType.Q8_0, q8).view(np.uint32), expected.view(np.uint32))
    with pytest.raises(ValueError, match="no exact Q8_0 encoding"):
        as_q8_0(QType.Q4_1, np.zeros(20, np.uint8))


def test_same_type_runs_merge_only_touching_matrices_of_one_type_and_width():
    q = DeviceWeight(int(QType.Q8_0), 64, 64, 4096)
    k = DeviceWeight(int(QType.Q8_0), 32, 64, q.ptr + q.nbytes)
    assert same_type_runs([q, k]) == (DeviceWeight(int(QType.Q8_0), 96, 64, 4096),)
    apart = DeviceWeight(int(QType.Q8_0), 32, 64, q.ptr + q.nbytes + 256)
    other_type = DeviceWeight(int(QType.F16), 32, 64, q.ptr + q.nbytes)
    other_width = DeviceWeight(int(QType.Q8_0), 32, 32, q.ptr + q.nbytes)
    for part in (apart, other_type, other_width):
        assert same_type_runs([q, part]) == (q, part)


def test_qkv_parts_start_on_16_byte_boundaries():
    # the real shapes end on a boundary (no padding: one merged run); an odd size pads the next part
    assert qkv_offsets([551936, 78848, 121856]) == [0, 551936, 630784]
    assert qkv_offsets([1000, 24, 40]) == [0, 1008, 1040]
