"""Weights on the device, kept in their GGUF formats: one counted allocation, uploaded in chunks
straight from the memory-mapped file (no dequantized copy on the host except 1-D tensors that
are not F32, which the kernels read as fp32)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor, align_up
from gpu_worker.backends.cuda.ops.quant_weight import DeviceWeight
from gpu_worker.model.dequant import dequantize
from gpu_worker.model.quant_types import QType

UPLOAD_CHUNK_BYTES = 64 * 1024 * 1024
_MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
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
    gate: DeviceWeight        # [intermediate, hidden]
    up: DeviceWeight
    down: DeviceWeight        # [hidden, intermediate]


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


def _needed_tensors(model) -> list[str]:
    names = ["token_embd.weight", "output_norm.weight"]
    if not model.config.tied_embeddings:
        names.append("output.weight")
    for i in range(model.config.num_layers):
        names += [f"blk.{i}.{m}.weight" for m in _MATRICES] + [f"blk.{i}.{v}" for v in _VECTORS]
    return names


def upload_weights(device, model, progress: Callable[[int, int], None] | None = None) -> ModelWeights:
    """Uploads every tensor the forward needs; progress(done_bytes, total_bytes) after each chunk."""
    names = _needed_tensors(model)
    host = {name: _host_bytes(model.tensors[name]) for name in names}
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
    def matrix(name: str) -> DeviceWeight:
        t = model.tensors[name]
        return DeviceWeight(qtype=int(t.qtype), rows=t.shape[0], cols=t.shape[1], ptr=base + offsets[name])

    def vector(name: str) -> DeviceTensor:
        return DeviceTensor(base + offsets[name], (model.tensors[name].shape[0],), np.dtype(np.float32))

    layers = []
    for i in range(model.config.num_layers):
        p = f"blk.{i}."
        layers.append(LayerWeights(
            attn_norm=vector(p + "attn_norm.weight"), bias_q=vector(p + "attn_q.bias"),
            bias_k=vector(p + "attn_k.bias"), bias_v=vector(p + "attn_v.bias"),
            ffn_norm=vector(p + "ffn_norm.weight"), q=matrix(p + "attn_q.weight"), k=matrix(p + "attn_k.weight"),
            v=matrix(p + "attn_v.weight"), o=matrix(p + "attn_output.weight"), gate=matrix(p + "ffn_gate.weight"),
            up=matrix(p + "ffn_up.weight"), down=matrix(p + "ffn_down.weight")))
    embd = matrix("token_embd.weight")
    lm_head = embd if model.config.tied_embeddings else matrix("output.weight")
    return ModelWeights(token_embd=embd, layers=tuple(layers), output_norm=vector("output_norm.weight"),
                        lm_head=lm_head, nbytes=total)
