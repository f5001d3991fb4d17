"""Launcher of cuda/attention_decode.cu: each query token over its paged KV context (GQA)."""
from __future__ import annotations

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.attention_common import attention_params
from gpu_worker.backends.cuda.ops.launch import launch


def launch_attention_decode(device, q: DeviceTensor, out: DeviceTensor, k_cache: DeviceTensor,
                            v_cache: DeviceTensor, block_tables: DeviceTensor, token_seq: DeviceTensor,
                            positions: DeviceTensor, block_size: int) -> None:
    """out[t, h] = softmax(q[t, h] K[0..pos_t]^T / 8) V over sequence token_seq[t]'s blocks.

    Shapes as in attention_common.attention_params; KV of every position <= pos_t must be written.
    """
    params = attention_params(q, out, k_cache, v_cache, block_tables, token_seq, positions, block_size)
    num_tokens, num_heads = q.shape[0], q.shape[1]
    num_kv_heads = k_cache.shape[1]
    launch(device.kernel("attention_decode_f32"), (num_tokens, num_kv_heads),
           (32 * (num_heads // num_kv_heads),), device.stream, params)
