"""Launchers of cuda/sampling.cu: penalties (in place), the draw, and logprobs.

The specification is gpu_worker/sampling/sampler.py; `SAMPLE_ARGS_DTYPE` mirrors `struct SampleArgs`
(cuda/sampling_common.cuh) field for field.
"""
from __future__ import annotations

import os

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch, ptr

SAMPLER_ENV = "QWEN_SERVE_GPU_SAMPLER"   # "bisect": the first, bisection-only draw kernel
DRAW_THREADS = 512      # QS_SAMPLE_THREADS
PENALTY_THREADS = 256
SEGMENT_THREADS = 256
NUM_SEGMENTS = 32       # QS_SEGMENTS
HIST_BINS = 256         # QS_HIST_BINS
MAX_TOP_LOGPROBS = 20

SAMPLE_ARGS_DTYPE = np.dtype([
    ("seed", "u8"), ("step", "u8"), ("row", "i4"), ("top_k", "i4"), ("top_p", "f8"), ("min_p", "f8"),
    ("temperature", "f4"), ("repetition_penalty", "f4"), ("frequency_penalty", "f4"),
    ("presence_penalty", "f4"), ("bias_offset", "i4"), ("bias_count", "i4"), ("seen_offset", "i4"),
    ("seen_count", "i4"), ("output_offset", "i4"), ("output_count", "i4"), ("num_top_logprobs", "i4"),
    ("want_logprobs", "i4")], align=True)
if SAMPLE_ARGS_DTYPE.itemsize != 88:  # must match sizeof(SampleArgs)
    raise ImportError(f"SampleArgs record is {SAMPLE_ARGS_DTYPE.itemsize} bytes, the kernel expects 88")


def _check_args(logits: DeviceTensor, args: DeviceTensor) -> tuple[int, int]:
    check_tensor("logits", logits, (None, None), np.float32)
    if args.dtype != SAMPLE_ARGS_DTYPE:
        raise ValueError("args must be SAMPLE_ARGS_DTYPE records")
    return args.shape[0], logits.shape[1]


def launch_penalties(device, logits: DeviceTensor, args: DeviceTensor, bias_ids: DeviceTensor,
                     bias_values: DeviceTensor, seen_ids: DeviceTensor, output_ids: DeviceTensor,
                     output_counts: DeviceTensor) -> None:
    """Spec steps 1-3 in place on logits [rows, vocab] f32 for the args [num_sampled] records.

    Flat int32 id arrays (bias_values f32) indexed by each record's offset/count; seen and output
    ids distinct per sequence; ids < vocab (checked on the host when packing)."""
    num_sampled, vocab = _check_args(logits, args)
    check_tensor("bias_ids", bias_ids, (None,), np.int32)
    check_tensor("bias_values", bias_values, (bias_ids.shape[0],), np.float32)
    check_tensor("seen_ids", seen_ids, (None,), np.int32)
    check_tensor("output_ids", output_ids, (None,), np.int32)
    check_tensor("output_counts", output_counts, (output_ids.shape[0],), np.int32)
    launch(device.kernel("sampling_penalties_f32"), (num_sampled,), (PENALTY_THREADS,), device.stream,
           ptr(logits), np.int32(vocab), ptr(args), ptr(bias_ids), ptr(bias_values), ptr(seen_ids),
           ptr(output_ids), ptr(output_counts))


def launch_draw(device, logits: DeviceTensor, args: DeviceTensor, seg_best: DeviceTensor, seg_mass: DeviceTensor,
                seg_hist: DeviceTensor, out_tokens: DeviceTensor) -> None:
    """Spec steps 4-7: one token per record into out_tokens [num_sampled] int32.

    Scratch: seg_best [num_sampled, NUM_SEGMENTS] uint64, seg_mass [num_sampled, NUM_SEGMENTS] f64,
    seg_hist [num_sampled, NUM_SEGMENTS, HIST_BINS] int32 (written by the segment kernels here)."""
    num_sampled, vocab = _check_args(logits, args)
    check_tensor("seg_best", seg_best, (num_sampled, NUM_SEGMENTS), np.uint64)
    check_tensor("seg_mass", seg_mass, (num_sampled, NUM_SEGMENTS), np.float64)
    check_tensor("seg_hist", seg_hist, (num_sampled, NUM_SEGMENTS, HIST_BINS), np.int32)
    check_tensor("out_tokens", out_tokens, (num_sampled,), np.int32)
    stream, grid = device.stream, (num_sampled, NUM_SEGMENTS)
    if os.environ.get(SAMPLER_ENV) == "bisect":  # the first, slower sampler (see sampling.cu)
        launch(device.kernel("sampling_draw_bisect_f32"), (num_sampled,), (DRAW_THREADS,), stream,
               ptr(logits), np.int32(vocab), ptr(args), ptr(out_tokens))
        return
    launch(device.kernel("sampling_segment_best_f32"), grid, (SEGMENT_THREADS,), stream,
           ptr(logits), np.int32(vocab), ptr(args), ptr(seg_best))
    launch(device.kernel("sampling_segment_stats_f32"), grid, (SEGMENT_THREADS,), stream,
           ptr(logits), np.int32(vocab), ptr(args), ptr(seg_best), ptr(seg_mass), ptr(seg_hist))
    launch(device.kernel("sampling_draw_f32"), (num_sampled,), (DRAW_THREADS,), stream,
           ptr(logits), np.int32(vocab), ptr(args), ptr(seg_best), ptr(seg_mass), ptr(seg_hist), ptr(out_tokens))


def launch_logprobs(device, raw_logits: DeviceTensor, args: DeviceTensor, tokens: DeviceTensor,
                    out_logprob: DeviceTensor, out_top_ids: DeviceTensor, out_top_logprobs: DeviceTensor) -> None:
    """Log-softmax of raw (pre-penalty) logits: the sampled token's value [num_sampled] f32 and the
    top ids/values [num_sampled, MAX_TOP_LOGPROBS]; records with want_logprobs = 0 are skipped."""
    num_sampled, vocab = _check_args(raw_logits, args)
    check_tensor("tokens", tokens, (num_sampled,), np.int32)
    check_tensor("out_logprob", out_logprob, (num_sampled,), np.float32)
    check_tensor("out_top_ids", out_top_ids, (num_sampled, MAX_TOP_LOGPROBS), np.int32)
    check_tensor("out_top_logprobs", out_top_logprobs, (num_sampled, MAX_TOP_LOGPROBS), np.float32)
    launch(device.kernel("sampling_logprobs_f32"), (num_sampled,), (DRAW_THREADS,), device.stream,
           ptr(raw_logits), np.int32(vocab), ptr(args), ptr(tokens), ptr(out_logprob), ptr(out_top_ids),
           ptr(out_top_logprobs), np.int32(MAX_TOP_LOGPROBS))
