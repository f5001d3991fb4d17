"""Per-kernel GPU time of one decode step (events around 100 back-to-back launches of each op),
to find where the decode graph's time goes. A diagnostic, not a test.

    python3 tests/gpu/profile_decode_step.py MODEL.gguf [--batch 1] [--context 256]"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from batch_runner import run_batch  # noqa: E402
from gpu_worker.backends.cuda.backend import CudaBackend  # noqa: E402
from gpu_worker.backends.cuda.graphs import DecodeGraphs  # noqa: E402
from gpu_worker.backends.cuda.ops.attention import DecodeRope, launch_attention  # noqa: E402
from gpu_worker.backends.cuda.ops.matvec import NO_FUSION, MatvecFusion  # noqa: E402
from gpu_worker.backends.cuda.ops.rms_norm import launch_rms_norm  # noqa: E402
from gpu_worker.backends.cuda.ops.rope_kv import launch_rope_kv  # noqa: E402
from gpu_worker.backends.cuda.ops.swiglu import launch_swiglu  # noqa: E402
from gpu_worker.model.gguf_loader import load_gguf  # noqa: E402
from gpu_worker.model.quant_types import type_name  # noqa: E402
from gpu_worker.sampling.params import SamplingParams  # noqa: E402


def time_us(device, fn, repeats: int = 50) -> float:
    """GPU microseconds per call of fn: `repeats` calls captured in one CUDA graph (so host launch
    cost is out), replayed 5 times between events."""
    cuda = device.cuda
    fn()
    graphs = DecodeGraphs(device.stream, (repeats,))
    graphs.capture(repeats, lambda n: [fn() for _ in range(n)])
    graphs.replay(repeats)
    start, end = cuda.Event(), cuda.Event()
    start.record(device.stream)
    for _ in range(5):
        graphs.replay(repeats)
    end.record(device.stream)
    end.synchronize()
    graphs.close()
    return 1e3 * end.time_since(start) / (5 * repeats)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--linear", choices=("mma", "fp32"), help="linear kernels (QWEN_SERVE_CUDA_LINEAR)")
    args = parser.parse_args()
    b = CudaBackend(load_gguf(args.model), max_num_tokens=max(1024, args.batch * args.context), max_num_seqs=max(64, args.batch),
                    max_model_len=2048, linear=args.linear)
    b.allocate_kv_cache(4096, 16)
    try:
        profile(b, args)
    finally:
        b.close()


def profile(b, args) -> None:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, b.config.vocab_size, args.context).tolist() for _ in range(args.batch)]
    run_batch(b, prompts, [SamplingParams(temperature=0.0)] * args.batch, 2)  # leaves valid decode inputs
    f, d, a, m, cfg, n = b.forward, b.device, b.forward.acts, b.forward.meta, b.config, args.batch
    layer, (k_cache, v_cache) = f.weights.layers[0], f.kv[0]
    hd = cfg.head_dim
    q3 = a.q.rows(0, n).view(n, cfg.num_heads, hd)
    rows, used = [], {}   # used: the time of each launch a layer of this step makes, by role
    eps = cfg.rms_norm_eps
    # (role, name, weight, x, y, fusion, column of y): q, k, v as the forward runs them (the
    # tensor-core path: one launch per same-type run into the columns of acts.qkv)
    if f.linear == "mma":
        linears, column = [], 0
        for run in layer.qkv_runs:
            linears.append(("qkv", f"qkv run at column {column}", run, a.normed, a.qkv, NO_FUSION, column))
            column += run.rows
    else:
        linears = [("qkv", name, w, a.normed, y, NO_FUSION, 0)
                   for name, w, y in (("q", layer.q, a.q), ("k", layer.k, a.k), ("v", layer.v, a.v))]
    linears.append(("o", "o", layer.o, a.attn, a.delta, NO_FUSION, 0))
    if layer.gate_up is not None:   # one interleaved matrix with the SwiGLU epilogue
        linears.append(("gate_up", "gate_up+swiglu", layer.gate_up, a.normed, a.gate, MatvecFusion(epilogue="swiglu"),
                        0))
    else:
        linears += [("gate", "gate", layer.gate, a.normed, a.gate, NO_FUSION, 0),
                    ("up", "up", layer.up, a.normed, a.up, NO_FUSION, 0)]
    linears.append(("down", "down", layer.down, a.gate, a.delta, NO_FUSION, 0))
    linears.append(("lm_head", "lm_head", f.weights.lm_head, a.final, a.logits, NO_FUSION, 0))
    for role, name, weight, x, y, fusion, column in linears:
        us = time_us(d, lambda w=weight, x=x, y=y, fu=fusion, c=column: f._linear(w, x.rows(0, n), y.rows(0, n), fu,
                                                                                   column=c))
        used[role] = used.get(role, 0.0) + us
        gbs = weight.nbytes / us / 1e3
        rows.append((f"{f.linear} linear {name} {type_name(weight.qtype)} [{weight.rows}x{weight.cols}]", us,
                     f"{gbs:,.0f} GB/s"))
    qkv_rows = f._qkv(layer, a.normed.rows(0, n), n, NO_FUSION)   # where rope_kv reads (launches them once)
    res, normed = a.residual.rows(0, n), a.normed.rows(0, n)
    used["rms_norm"] = time_us(d, lambda: launch_rms_norm(d, res, layer.ffn_norm, normed, eps,
                                                          delta=a.delta.rows(0, n), write_residual=False))
    rows.append(("rms_norm", used["rms_norm"], ""))
    used["rope_kv"] = time_us(d, lambda: launch_rope_kv(d, qkv_rows, (layer.bias_q, layer.bias_k, layer.bias_v),
                                                       m.positions.view(n), m.slot_mapping.view(n), f.rope,
                                                       k_cache, v_cache))
    rows.append(("rope_kv", used["rope_kv"], ""))
    used["attention"] = time_us(d, lambda: launch_attention(   # as a prompt chunk's launch runs (after rope_kv)
        d, q3, a.attn.rows(0, n).view(n, cfg.num_heads, hd), k_cache, v_cache, m.block_tables,
        m.token_seq.view(n), m.positions.view(n), f.block_size))
    rows.append((f"attention ctx {args.context} (prompt-chunk launch)", used["attention"], ""))
    # what a decode step runs: attention with rope_kv's work inside (no rope_kv launch)
    rope = DecodeRope(qkv_rows, (layer.bias_q, layer.bias_k, layer.bias_v), f.rope, m.slot_mapping.view(n))
    used["attention_rope"] = time_us(d, lambda: launch_attention(
        d, q3, a.attn.rows(0, n).view(n, cfg.num_heads, hd), k_cache, v_cache, m.block_tables,
        m.token_seq.view(n), m.positions.view(n), f.block_size, rope=rope))
    rows.append((f"attention ctx {args.context} + rope/KV write (decode steps)", used["attention_rope"], ""))
    used["swiglu"] = time_us(d, lambda: launch_swiglu(d, a.gate.rows(0, n), a.up.rows(0, n), a.gate.rows(0, n)))
    rows.append(("swiglu", used["swiglu"], ""))
    bucket = b.graphs.bucket_for(n)
    start, end = d.cuda.Event(), d.cuda.Event()
    start.record(d.stream)
    for _ in range(20):
        b.graphs.replay(bucket)
    end.record(d.stream)
    end.synchronize()
    rows.append((f"whole decode graph (bucket {bucket})", 1e3 * end.time_since(start) / 20, ""))
    per_layer = (sum(used[role] for role in ("qkv", "o", "gate_up", "gate", "up", "down") if role in used)
                 + 2 * used["rms_norm"] + used["attention_rope"]
                 + (0.0 if layer.gate_up is not None else used["swiglu"]))
    print(f"\n| op (batch {n}) | us per launch | note |\n|---|---|---|")
    for name, us, extra in rows:
        print(f"| {name} | {us:.1f} | {extra} |")
    print(f"| sum of one layer's launches x {cfg.num_layers} + lm_head | "
          f"{per_layer * cfg.num_layers + used['lm_head']:.0f} | |")


if __name__ == "__main__":
    main()
