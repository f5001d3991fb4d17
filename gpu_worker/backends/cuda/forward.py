"""The Qwen2 forward on the device, over static buffers (so a decode step can be captured in a
CUDA graph and replayed): embedding -> 24 x (norm, q/k/v, rope+KV write, attention, o, norm,
gate/up, SwiGLU, down) -> final norm of the sampled rows -> LM head.

Every linear layer goes through one kernel whatever the number of tokens, so a token's result
never depends on the batch and a prompt gives the same KV and logits alone, batched or chunked:
- linear="mma" (the default): cuda/linear_mma.cu, tensor cores with fp16 operands and fp32 sums,
  bandwidth-bound at one token and compute-bound at thousands; gate and up run as one
  row-interleaved matrix with SwiGLU in the epilogue where the model allows it;
- linear="fp32": cuda/matvec.cu, fp32 FMAs (the numpy reference's arithmetic, but compute-bound
  from a few tokens on); with fused=True the RMSNorm moves into its prologue as well.
Decode steps (run(decode=True)) launch less with the same values: attention does rope_kv's work,
and at 1-2 tokens the tensor-core path folds the norms into the linears too (_norms_fold).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.graphs import StreamGraph
from gpu_worker.backends.cuda.launcher import RecordedLaunches
from gpu_worker.backends.cuda.ops.attention import DecodeRope, launch_attention
from gpu_worker.backends.cuda.ops.embedding import EmbeddingOp
from gpu_worker.backends.cuda.ops.linear_mma import LinearMmaOp
from gpu_worker.backends.cuda.ops.matvec import NO_FUSION, MatvecFusion, MatvecOp
from gpu_worker.backends.cuda.ops.rms_norm import launch_rms_norm
from gpu_worker.backends.cuda.ops.rope_kv import QkvRows, RopeTables, launch_rope_kv, rope_tables_host
from gpu_worker.backends.cuda.ops.swiglu import launch_swiglu
from gpu_worker.backends.cuda.weights import ModelWeights

LINEAR_KERNELS = ("mma", "fp32")
# Decode steps of up to this many tokens fold the norms into the linears. Every CTA normalizes its
# tokens itself, so the redundant work grows with them. H200, synthetic weights, against separate
# norm launches (ms per step): batch 1 1.00 -> 0.94, batch 2 1.049 -> 1.008, but batch 4 1.09 -> 1.17,
# batch 8 1.24 -> 1.40, batch 16 1.60 -> 2.27. Since the norm kernels normalize x while W is still
# loading (92d9d4c), 4 tokens gain too: 1.141 -> 1.134 ms; 8 still lose: 1.238 -> 1.434 ms.
NORM_FOLD_MAX_TOKENS = 4
RECORDED_SHAPES = 128  # eager forwards kept (recorded launches or graphs of them), least recent dropped
META_FIELDS = ("input_ids", "positions", "slot_mapping", "token_seq")


@dataclass(frozen=True)
class StepMeta:
    """Per-step int32 inputs on the device, all inside one buffer (one upload per step)."""

    input_ids: DeviceTensor     # [max_tokens]
    positions: DeviceTensor     # [max_tokens]
    slot_mapping: DeviceTensor  # [max_tokens]; -1 = no KV write (graph padding)
    token_seq: DeviceTensor     # [max_tokens] sequence index of each token
    logit_rows: DeviceTensor    # [max_seqs] token index of each logits row
    block_tables: DeviceTensor  # [max_seqs, max_blocks_per_seq]
    base: DeviceTensor          # the whole buffer, flat int32


class Activations:
    """fp32 scratch for up to `max_tokens` tokens and `max_seqs` logits rows ("activations")."""

    def __init__(self, memory, config, max_tokens: int, max_seqs: int, weight_scratch_halves: int = 0) -> None:
        h, q_width = config.hidden_size, config.num_heads * config.head_dim
        kv_width = config.num_kv_heads * config.head_dim
        f32 = np.float32
        self.residual = memory.tensor("activations", (max_tokens, h), f32)
        self.delta = memory.tensor("activations", (max_tokens, h), f32)
        self.normed = memory.tensor("activations", (max_tokens, h), f32)
        self.q = memory.tensor("activations", (max_tokens, q_width), f32)
        self.k = memory.tensor("activations", (max_tokens, kv_width), f32)
        self.v = memory.tensor("activations", (max_tokens, kv_width), f32)
        # [tokens, q | k | v]: what the merged q/k/v launches of the tensor-core path write
        self.qkv = memory.tensor("activations", (max_tokens, q_width + 2 * kv_width), f32)
        self.attn = memory.tensor("activations", (max_tokens, q_width), f32)
        self.gate = memory.tensor("activations", (max_tokens, config.intermediate_size), f32)
        self.up = memory.tensor("activations", (max_tokens, config.intermediate_size), f32)
        self.final = memory.tensor("activations", (max_seqs, h), f32)
        # fp16 copy of a linear layer's input for the tensor-core gemm layout (ops/linear_mma.py);
        # x16_out: the SwiGLU epilogue's copy of its output (the down projection's input), which it
        # writes while its own input's copy in x16 is still being read
        widest_input = max(h, q_width, config.intermediate_size)
        self.x16 = memory.tensor("activations", (max(max_tokens, max_seqs) * widest_input,), np.float16)
        self.x16_out = memory.tensor("activations", (max_tokens * config.intermediate_size if weight_scratch_halves
                                                     else 1,), np.float16)
        # fp16 copy of a linear layer's W for the f16gemm layout (the LM head goes in row slices)
        self.w16 = memory.tensor("activations", (max(weight_scratch_halves, 1),), np.float16)
        self.logits = memory.tensor("logits", (max_seqs, config.vocab_size), f32)


LM_HEAD_SLICE_ROWS = 16384   # 256 f16gemm row tiles per LM head slice: 4 waves of CTAs at 256 tokens


def weight_scratch_halves(weights: ModelWeights) -> int:
    """The f16gemm weight scratch: the largest layer matrix (gate/up: 17 MB at the real shapes),
    so that every layer linear runs in one slice, or 16384 LM head rows (29 MB) if more."""
    largest = max(w.rows * w.cols for layer in weights.layers
                  for w in (*layer.qkv_runs, layer.o, layer.gate, layer.up, layer.down, layer.gate_up)
                  if w is not None)
    lm_head = weights.lm_head
    return max(largest, min(lm_head.rows, LM_HEAD_SLICE_ROWS) * lm_head.cols)


def allocate_meta(memory, max_tokens: int, max_seqs: int, max_blocks_per_seq: int) -> StepMeta:
    sizes = [max_tokens] * len(META_FIELDS) + [max_seqs, max_seqs * max_blocks_per_seq]
    base = memory.tensor("activations", (sum(sizes),), np.int32)
    views, offset = [], 0
    for size in sizes:
        views.append(DeviceTensor(base.ptr + 4 * offset, (size,), np.dtype(np.int32)))
        offset += size
    *token_views, logit_rows, tables = views
    return StepMeta(*token_views, logit_rows=logit_rows,
                    block_tables=tables.view(max_seqs, max_blocks_per_seq), base=base)


class Qwen2Forward:
    """Launch sequence of one step over static buffers; `run` only enqueues work on the stream."""

    def __init__(self, device, config, weights: ModelWeights, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, max_positions: int, fused: bool = False,
                 linear: str = "mma", use_graphs: bool = False) -> None:
        self.device, self.config, self.weights = device, config, weights
        self.use_graphs = use_graphs   # eager shapes seen twice run as CUDA graphs (run())
        if linear not in LINEAR_KERNELS:
            raise ValueError(f"linear must be one of {LINEAR_KERNELS}, got {linear!r}")
        # fused (fp32 mat-vec only): RMSNorm inside the q/k/v and gate/up mat-vecs, o/down accumulate
        # into the residual, SwiGLU in the gate/up epilogue: 8 launches per layer, not 12.
        if fused and linear != "fp32":
            raise ValueError("the fused forward runs the fp32 mat-vec (linear='fp32')")
        self.fused, self.linear = fused, linear
        if fused and any(layer.gate_up is None for layer in weights.layers):
            raise ValueError("the fused forward needs interleaved gate/up weights")
        self.max_tokens, self.max_seqs = max_tokens, max_seqs
        self.acts = Activations(device.memory, config, max_tokens, max_seqs,
                                weight_scratch_halves(weights) if linear == "mma" else 0)
        self.meta = allocate_meta(device.memory, max_tokens, max_seqs, max_blocks_per_seq)
        cos, sin = rope_tables_host(max_positions, config.head_dim, config.rope_freq_base)
        self.rope = RopeTables(device.memory.tensor("activations", cos.shape, np.float32),
                               device.memory.tensor("activations", sin.shape, np.float32))
        device.cuda.memcpy_htod(self.rope.cos.ptr, cos)
        device.cuda.memcpy_htod(self.rope.sin.ptr, sin)
        self.max_positions = max_positions
        self.matvec = MatvecOp(device.module)
        self.linear_mma = LinearMmaOp(device.module, (self.acts.x16.ptr, self.acts.x16.shape[0]),
                                      (self.acts.w16.ptr, self.acts.w16.shape[0]))
        self.embedding = EmbeddingOp(device.module)
        self.kv: list[tuple[DeviceTensor, DeviceTensor]] = []
        self.block_size = 0
        # run()'s launches per shape, recorded the first time and replayed after: enqueueing the
        # ~530 launches of a prefill took 5-10 ms of Python on the GPU machine's host, their
        # replay 1.5-2.8 ms (H200 host, 2026-11-28). With graphs, a shape seen a second time is
        # captured from its recording as a CUDA graph, whose kernels run without the gaps between
        # stream launches (prefill of 512 tokens 5.41 -> 4.92 ms, of 32 tokens 2.54 -> 2.31 ms;
        # H200, synthetic weights). Not at the first time: serving 256 gRPC streams meets many
        # shapes once, and with a capture at every first run (5883833) that run measured 27.2k
        # tok/s against 36.4k here (its host-bound HF baselines also ran ~40% slower, though).
        self._recorded: OrderedDict[tuple, RecordedLaunches | StreamGraph] = OrderedDict()
        self.replayed_runs = 0   # runs served by a recording or its graph (tests, diagnostics)
        self._fold_checked: dict[int, bool] = {}   # _norms_fold per token count

    def set_kv_cache(self, kv: list[tuple[DeviceTensor, DeviceTensor]], block_size: int) -> None:
        """Per layer (k_cache, v_cache), each [num_blocks * block_size, num_kv_heads, head_dim] f16."""
        self.kv, self.block_size = kv, block_size
        self.drop_recordings()   # the recorded launches point at the old cache

    def drop_recordings(self) -> None:
        """Forgets every recorded shape (and destroys the graphs captured from them)."""
        for entry in self._recorded.values():
            entry.close()
        self._recorded.clear()

    def _linear(self, weight, x: DeviceTensor, y: DeviceTensor, fusion: MatvecFusion = NO_FUSION,
                x_unchanged: bool = False, column: int = 0, y16: DeviceTensor | None = None) -> None:
        """x_unchanged: x is the previous call's input, not written since (its fp16 copy is reused).
        The outputs land in columns [column, column + outputs) of y's rows (tensor-core path).
        y16: where a SwiGLU epilogue also writes the fp16 copy of y for the next linear (_x16_for)."""
        if self.linear == "mma":
            norm = (fusion.norm_weight_ptr, fusion.norm_eps) if fusion.norm_weight_ptr else None
            self.linear_mma(weight, x.ptr, y.ptr + 4 * column, x.shape[0], self.device.stream,
                            epilogue=fusion.epilogue, x_unchanged=x_unchanged, y_stride=y.shape[1], norm=norm,
                            y16_ptr=0 if y16 is None else y16.ptr)
        else:
            if column:
                raise ValueError("the fp32 mat-vec writes packed rows (column 0 only)")
            self.matvec(weight, x.ptr, y.ptr, x.shape[0], self.device.stream, fusion=fusion)

    def run(self, num_tokens: int, num_logits: int, all_rows: bool, decode: bool = False) -> None:
        """Enqueues the forward of `num_tokens` tokens (any mix of prompt chunks and decode tokens).

        Logits rows: meta.logit_rows[:num_logits], or every token when all_rows (decode graphs).
        decode: every token is the newest of its sequence, all earlier positions in the KV cache
        (padding tokens write no KV): attention then applies RoPE and writes KV itself, without
        rope_kv's launch (bitwise the same values).
        Every launch reads its per-step inputs from the static buffers, so the launch sequence is
        a function of the shape alone: with a module that records (launcher.DriverModule), a shape
        seen before replays its recorded launches (with use_graphs, as a CUDA graph captured from
        them at its second run) instead of running this Python again."""
        record = getattr(self.device.module, "recording", None)
        if record is None:
            self.enqueue(num_tokens, num_logits, all_rows, decode)
            return
        # The launcher's scratches decide its tiles (tests shrink them to force other layouts).
        key = (num_tokens, num_logits, all_rows, decode, self.linear_mma.scratch_sizes)
        recorded = self._recorded.get(key)
        if recorded is not None:
            self._recorded.move_to_end(key)
            if self.use_graphs and isinstance(recorded, RecordedLaunches):   # a shape that repeats
                recorded = self._recorded[key] = StreamGraph(self.device.stream, recorded.replay)
            recorded.replay()
            self.replayed_runs += 1
            return
        with record() as recorded:
            self.enqueue(num_tokens, num_logits, all_rows, decode)
        self._recorded[key] = recorded
        if len(self._recorded) > RECORDED_SHAPES:
            self._recorded.popitem(last=False)[1].close()

    def enqueue(self, num_tokens: int, num_logits: int, all_rows: bool, decode: bool) -> None:
        """run()'s launches, made from Python each time, outside run()'s recordings and graphs
        (the decode graphs record and capture their own)."""
        a, m, cfg, dev = self.acts, self.meta, self.config, self.device
        t = num_tokens
        self.embedding(self.weights.token_embd, m.input_ids.ptr, a.residual.ptr, t, dev.stream)
        residual, delta = a.residual.rows(0, t), a.delta.rows(0, t)
        folded = self.fused or (decode and self._norms_fold(t))
        for i, layer in enumerate(self.weights.layers):
            if folded:
                self._layer_fused(i, layer, t, decode)
            else:
                self._layer(i, layer, t, decode)
        final = a.final.rows(0, num_logits)
        launch_rms_norm(dev, residual, self.weights.output_norm, final, cfg.rms_norm_eps,
                        delta=None if folded else delta,
                        row_ids=None if all_rows else m.logit_rows.view(num_logits))
        self._linear(self.weights.lm_head, final, a.logits.rows(0, num_logits))

    def _x16_for(self, weight, x: DeviceTensor, buffer: DeviceTensor | None = None,
                 note: bool = True) -> DeviceTensor | None:
        """Where x's producer should also write x's fp16 slot-order copy: in `buffer` (default
        acts.x16) when the tensor-core launcher multiplies x by `weight` in an f16 layout, else
        None. Noted with the launcher, so that it converts nothing (a SwiGLU epilogue's copy is
        noted by the launcher itself: note=False). Saves a conversion pass per linear layer (H200,
        synthetic weights, forward as one graph: 256 tokens 3.148 -> 3.066 ms, 512 4.910 -> 4.865)."""
        t, cols = x.shape
        if self.linear != "mma" or weight is None or not self.linear_mma.wants_x16(weight, t):
            return None
        copy = (self.acts.x16 if buffer is None else buffer).view(t, cols)
        if note:
            self.linear_mma.note_x16(x.ptr, t, cols, copy.ptr)
        return copy

    def _layer(self, i: int, layer, t: int, decode: bool) -> None:
        """residual += attn(norm(residual)) + mlp(norm(...)), the residual add fused into the norms."""
        a, cfg, dev = self.acts, self.config, self.device
        residual, delta, normed = a.residual.rows(0, t), a.delta.rows(0, t), a.normed.rows(0, t)
        qkv_first = layer.qkv_runs[0] if self.linear == "mma" else None
        launch_rms_norm(dev, residual, layer.attn_norm, normed, cfg.rms_norm_eps,
                        delta=delta if i else None, write_residual=True, out16=self._x16_for(qkv_first, normed))
        self._attention(i, layer, t, self._qkv(layer, normed, t, NO_FUSION), decode)
        self._linear(layer.o, a.attn.rows(0, t), delta)
        launch_rms_norm(dev, residual, layer.ffn_norm, normed, cfg.rms_norm_eps, delta=delta, write_residual=True,
                        out16=self._x16_for(layer.gate if layer.gate_up is None else layer.gate_up, normed))
        gate, up = a.gate.rows(0, t), a.up.rows(0, t)
        if layer.gate_up is not None:   # one matrix, rows gate_0, up_0, gate_1, ... -> silu(gate) * up
            self._linear(layer.gate_up, normed, gate, MatvecFusion(epilogue="swiglu"),
                         y16=self._x16_for(layer.down, gate, a.x16_out, note=False))
        else:
            self._linear(layer.gate, normed, gate)
            self._linear(layer.up, normed, up)
            launch_swiglu(dev, gate, up, gate)
        self._linear(layer.down, gate, delta)

    def _norms_fold(self, num_tokens: int) -> bool:
        """Decode steps of up to NORM_FOLD_MAX_TOKENS tokens on the tensor-core path: whether every
        layer's q/k/v runs and gate/up pick a tile with an RMSNorm prologue (linear_mma*_norm_*), so
        that _layer_fused runs them: the norms need no launches of their own (bitwise the same
        values, GPU tests). Batch 1 on an H200: rms_norm took 2.9 us per launch, twice per layer."""
        if self.linear != "mma" or num_tokens > NORM_FOLD_MAX_TOKENS:
            return False
        if num_tokens not in self._fold_checked:
            op = self.linear_mma
            self._fold_checked[num_tokens] = all(
                layer.gate_up is not None and op.can_norm(layer.gate_up, num_tokens, "swiglu")
                and all(op.can_norm(run, num_tokens) for run in layer.qkv_runs) for layer in self.weights.layers)
        return self._fold_checked[num_tokens]

    def _layer_fused(self, i: int, layer, t: int, decode: bool) -> None:
        """Each RMSNorm inside the linear that reads it; o and down add into the residual stream."""
        a, cfg = self.acts, self.config
        residual, gate = a.residual.rows(0, t), a.gate.rows(0, t)
        norm = MatvecFusion(norm_weight_ptr=layer.attn_norm.ptr, norm_eps=cfg.rms_norm_eps)
        self._attention(i, layer, t, self._qkv(layer, residual, t, norm), decode)
        self._linear(layer.o, a.attn.rows(0, t), residual, MatvecFusion(epilogue="accumulate"))
        self._linear(layer.gate_up, residual, gate,
                     MatvecFusion(epilogue="swiglu", norm_weight_ptr=layer.ffn_norm.ptr, norm_eps=cfg.rms_norm_eps))
        self._linear(layer.down, gate, residual, MatvecFusion(epilogue="accumulate"))

    def _qkv(self, layer, x: DeviceTensor, t: int, fusion: MatvecFusion) -> QkvRows:
        """q, k, v of x; where rope_kv finds them. The tensor-core path runs one launch per run of
        same-type matrices (layer.qkv_runs) into the columns of acts.qkv: a row's output depends
        only on (K, type), so merging changes no bit."""
        a, cfg = self.acts, self.config
        q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q_out = a.q.rows(0, t).view(t, cfg.num_heads, cfg.head_dim)
        if self.linear == "mma":
            qkv, column = a.qkv.rows(0, t), 0
            for n, run in enumerate(layer.qkv_runs):
                self._linear(run, x, qkv, fusion, x_unchanged=n > 0, column=column)
                column += run.rows
            stride = qkv.shape[1]
            return QkvRows(q_in=qkv.ptr, k_in=qkv.ptr + 4 * q_width, v_in=qkv.ptr + 4 * (q_width + kv_width),
                           q_in_stride=stride, kv_in_stride=stride, q_out=q_out)
        self._linear(layer.q, x, a.q.rows(0, t), fusion)
        self._linear(layer.k, x, a.k.rows(0, t), fusion)
        self._linear(layer.v, x, a.v.rows(0, t), fusion)
        return QkvRows(q_in=q_out.ptr, k_in=a.k.ptr, v_in=a.v.ptr, q_in_stride=q_width, kv_in_stride=kv_width,
                       q_out=q_out)

    def _attention(self, i: int, layer, t: int, rows: QkvRows, decode: bool) -> None:
        """RoPE + KV write of this chunk, then attention of q over each sequence's KV -> acts.attn
        (a decode step: both in the attention launch)."""
        a, m, cfg, dev = self.acts, self.meta, self.config, self.device
        k_cache, v_cache = self.kv[i]
        positions, token_seq, slots = m.positions.view(t), m.token_seq.view(t), m.slot_mapping.view(t)
        biases = (layer.bias_q, layer.bias_k, layer.bias_v)
        rope = DecodeRope(rows, biases, self.rope, slots) if decode else None
        if rope is None:
            launch_rope_kv(dev, rows, biases, positions, slots, self.rope, k_cache, v_cache)
        out = a.attn.rows(0, t)
        out16 = self._x16_for(layer.o, out)
        launch_attention(dev, rows.q_out, out.view(t, cfg.num_heads, cfg.head_dim), k_cache, v_cache,
                         m.block_tables, token_seq, positions, self.block_size, rope=rope, out16=out16)
