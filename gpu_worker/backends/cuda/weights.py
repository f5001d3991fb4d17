"""Weights on the device, kept in their GGUF formats: one counted allocation, uploaded in chunks
straight from the memory-mapped file (no dequantized copy on the host except 1-D tensors that
are not F32, which the kernels read as fp32). One exception keeps the values and changes the
encoding: q/k/v parts in Q4_0 / Q5_0 next to a Q8_0 part go as Q8_0 (qkv_device_types)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor, align_up
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.model.dequant import Q8_0_EXACT_FROM, as_q8_0, dequantize
from gpu_worker.model.quant_types import QType, quant_spec

UPLOAD_CHUNK_BYTES = 64 * 1024 * 1024
_MATRICES = ("attn_output", "ffn_gate", "ffn_up", "ffn_down")   # q, k and v go as one blob: attn_qkv
_QKV = ("attn_q", "attn_k", "attn_v")
_VECTORS = ("attn_norm.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias", "ffn_norm.weight")


@dataclass(frozen=True)
class LayerWeights:
    attn_norm: DeviceTensor   # [hidden] f32
    bias_q: DeviceTensor      # [num_heads * head_dim] f32
    bias_k: DeviceTensor      # [num_kv_heads * head_dim] f32
    bias_v: DeviceTensor
    ffn_norm: DeviceTensor    # [hidden] f32
    q: DeviceWeight           # [num_heads * head_dim, hidden] (file format)
    k: DeviceWeight
    v: DeviceWeight
    o: DeviceWeight           # [hidden, num_heads * head_dim]
    gate: DeviceWeight | None  # [intermediate, hidden]; None when gate_up holds them
    up: DeviceWeight | None
    down: DeviceWeight        # [hidden, intermediate]
    gate_up: DeviceWeight | None = None  # [2 * intermediate, hidden] rows gate_0, up_0, gate_1, ...
    # q, k, v stored back to back, merged where neighbours share a type: one matrix per run, its
    # outputs the matching columns of a [tokens, q + k + v] buffer (one launch per run, not three)
    qkv_runs: tuple[DeviceWeight, ...] = ()


@dataclass(frozen=True)
class ModelWeights:
    token_embd: DeviceWeight  # [vocab, hidden]
    layers: tuple[LayerWeights, ...]
    output_norm: DeviceTensor
    lm_head: DeviceWeight     # output.weight, or token_embd when tied (not uploaded twice)
    nbytes: int               # bytes of the one device allocation holding all of the above


def _host_bytes(tensor) -> np.ndarray:
    """What goes to the device: raw bytes for matrices; fp32 for vectors."""
    if len(tensor.shape) == 1 and QType(tensor.qtype) != QType.F32:
        return np.ascontiguousarray(dequantize(tensor), dtype=np.float32).view(np.uint8).reshape(-1)
    return tensor.data


def _host_data(model, name: str) -> np.ndarray:
    if name.endswith("ffn_gate_up"):
        return _interleaved_gate_up(model, int(name.split(".")[1]))
    if name.endswith("attn_qkv"):
        return _qkv_bytes(model, int(name.split(".")[1]))
    return _host_bytes(model.tensors[name])


def can_interleave_gate_up(model) -> bool:
    """The fused SwiGLU mat-vec needs gate and up of one type in every layer."""
    return all(model.tensors[f"blk.{i}.ffn_gate.weight"].qtype == model.tensors[f"blk.{i}.ffn_up.weight"].qtype
               for i in range(model.config.num_layers))


def _interleaved_gate_up(model, i: int) -> np.ndarray:
    """Rows gate_0, up_0, gate_1, up_1, ... (raw bytes) # [2 * intermediate * row_bytes] uint8."""
    gate = model.tensors[f"blk.{i}.ffn_gate.weight"].rows_view()
    up = model.tensors[f"blk.{i}.ffn_up.weight"].rows_view()
    rows = np.empty((2 * gate.shape[0], gate.shape[1]), np.uint8)
    rows[0::2], rows[1::2] = gate, up
    return rows.reshape(-1)


def qkv_offsets(nbytes: list[int]) -> list[int]:
    """Where q, k and v start in their blob: back to back, each at a 16-byte boundary (the kernels
    copy weights with 16-byte cp.async from the matrix start), so a part that does not end on one
    is followed by padding (and then not merged with the next: same_type_runs)."""
    offsets, end = [], 0
    for size in nbytes:
        offsets.append(-(-end // 16) * 16)
        end = offsets[-1] + size
    return offsets


def qkv_device_types(types: list[QType]) -> list[QType]:
    """The types q, k and v are stored in: their own, except that a mix of Q8_0 with Q4_0 / Q5_0
    (the default model: v in Q8_0 in 12 of 24 layers, q and k in Q5_0) is stored all in Q8_0,
    which holds those values exactly (dequant.as_q8_0). Then the three form one run and one
    launch: batch 1 spent ~2.6 us per layer on v's own launch (H200), for 344 KB more of
    weights per such layer (Q5_0 q and k: 22 -> 34 bytes per 32 values)."""
    types = [QType(t) for t in types]
    if len(set(types)) > 1 and all(t == QType.Q8_0 or t in Q8_0_EXACT_FROM for t in types):
        return [QType.Q8_0] * len(types)
    return types


def stored_tensor_bytes(model) -> int:
    """Bytes the device holds for the file's tensors, before alignment padding: the file's own,
    with q/k/v re-encoded where qkv_device_types says so (the default model: 485,452,288 bytes in
    the file, 489,581,056 stored)."""
    total = sum(t.nbytes for t in model.tensors.values())
    for i in range(model.config.num_layers):
        for qtype, t in _qkv_parts(model, i):
            total += t.shape[0] * quant_spec(qtype).row_nbytes(t.shape[1]) - t.nbytes
    return total


def _qkv_parts(model, i: int) -> list[tuple[QType, object]]:
    """(device type, tensor) of q, k and v."""
    tensors = [model.tensors[f"blk.{i}.{m}.weight"] for m in _QKV]
    return list(zip(qkv_device_types([t.qtype for t in tensors]), tensors))


def _qkv_bytes(model, i: int) -> np.ndarray:
    """The bytes of q, k and v (re-encoded where qkv_device_types says so), back to back at
    qkv_offsets (zero padding) # uint8."""
    parts = [t.data if QType(t.qtype) == qtype else as_q8_0(t.qtype, t.data) for qtype, t in _qkv_parts(model, i)]
    offsets = qkv_offsets([p.nbytes for p in parts])
    blob = np.zeros(offsets[-1] + parts[-1].nbytes, np.uint8)
    for offset, part in zip(offsets, parts):
        blob[offset:offset + part.nbytes] = part
    return blob


def same_type_runs(parts: list[DeviceWeight]) -> tuple[DeviceWeight, ...]:
    """Merges neighbouring matrices that lie back to back in memory with the same type and
    columns into one taller matrix (rows stacked): q, k, v of one type become one launch."""
    runs = [parts[0]]
    for part in parts[1:]:
        last = runs[-1]
        if part.qtype == last.qtype and part.cols == last.cols and part.ptr == last.ptr + last.nbytes:
            runs[-1] = DeviceWeight(qtype=last.qtype, rows=last.rows + part.rows, cols=last.cols, ptr=last.ptr)
        else:
            runs.append(part)
    return tuple(runs)


def _needed_tensors(model, interleave: bool) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    if not model.config.tied_embeddings:
        names.append("output.weight")
    matrices = [m for m in _MATRICES if not (interleave and m in ("ffn_gate", "ffn_up"))]
    for i in range(model.config.num_layers):
        names += [f"blk.{i}.attn_qkv"] + [f"blk.{i}.{m}.weight" for m in matrices]
        names += [f"blk.{i}.{v}" for v in _VECTORS]
        if interleave:
            names.append(f"blk.{i}.ffn_gate_up")
    return names


def upload_weights(device, model, progress: Callable[[int, int], None] | None = None,
                   interleave_gate_up: bool = False) -> ModelWeights:
    """Uploads every tensor the forward needs; progress(done_bytes, total_bytes) after each chunk.
    interleave_gate_up stores each layer's gate and up as one row-interleaved matrix instead."""
    names = _needed_tensors(model, interleave_gate_up)
    host = {name: _host_data(model, name) for name in names}
    offsets, total = {}, 0
    for name in names:
        offsets[name] = total
        total = align_up(total + host[name].nbytes)
    base = device.memory.allocate("weights", total)
    done = 0
    for name in names:
        data = host[name]
        for start in range(0, data.nbytes, UPLOAD_CHUNK_BYTES):
            chunk = data[start:start + UPLOAD_CHUNK_BYTES]
            device.cuda.memcpy_htod(base + offsets[name] + start, chunk)
            done += chunk.nbytes
            if progress:
                progress(done, sum(h.nbytes for h in host.values()))
    return _views(model, base, offsets, total)


def _views(model, base: int, offsets: dict[str, int], total: int) -> ModelWeights:
    def matrix(name: str) -> DeviceWeight | None:
        if name not in offsets:
            return None
        t = model.tensors[name]
        return DeviceWeight(qtype=int(t.qtype), rows=t.shape[0], cols=t.shape[1], ptr=base + offsets[name])

    def gate_up(i: int) -> DeviceWeight | None:
        name = f"blk.{i}.ffn_gate_up"
        if name not in offsets:
            return None
        t = model.tensors[f"blk.{i}.ffn_gate.weight"]
        return DeviceWeight(qtype=int(t.qtype), rows=2 * t.shape[0], cols=t.shape[1], ptr=base + offsets[name])

    def qkv(i: int) -> tuple[DeviceWeight, ...]:
        """q, k, v: views of the attn_qkv blob, at qkv_offsets, in their device types."""
        parts = _qkv_parts(model, i)
        starts = qkv_offsets([t.shape[0] * quant_spec(qtype).row_nbytes(t.shape[1]) for qtype, t in parts])
        return tuple(DeviceWeight(qtype=int(qtype), rows=t.shape[0], cols=t.shape[1],
                                  ptr=base + offsets[f"blk.{i}.attn_qkv"] + start)
                     for (qtype, t), start in zip(parts, starts))

    def vector(name: str) -> DeviceTensor:
        return DeviceTensor(base + offsets[name], (model.tensors[name].shape[0],), np.dtype(np.float32))

    layers = []
    for i in range(model.config.num_layers):
        p = f"blk.{i}."
        q, k, v = qkv(i)
        layers.append(LayerWeights(
            attn_norm=vector(p + "attn_norm.weight"), bias_q=vector(p + "attn_q.bias"),
            bias_k=vector(p + "attn_k.bias"), bias_v=vector(p + "attn_v.bias"),
            ffn_norm=vector(p + "ffn_norm.weight"), q=q, k=k, v=v, o=matrix(p + "attn_output.weight"),
            gate=matrix(p + "ffn_gate.weight"), up=matrix(p + "ffn_up.weight"), down=matrix(p + "ffn_down.weight"),
            gate_up=gate_up(i), qkv_runs=same_type_runs([q, k, v])))
    embd = matrix("token_embd.weight")
    lm_head = embd if model.config.tied_embeddings else matrix("output.weight")
    return ModelWeights(token_embd=embd, layers=tuple(layers), output_norm=vector("output_norm.weight"),
                        lm_head=lm_head, nbytes=total)
