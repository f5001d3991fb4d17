"""Launcher of cuda/attention_prefill.cu: causal attention of prompt chunks, K/V tiles staged once
per query tile of up to 16 tokens of one sequence."""
from __future__ import annotations

import numpy as np

from gpu_worker.backends.cuda.device import DeviceTensor
from gpu_worker.backends.cuda.ops.attention_common import attention_params
from gpu_worker.backends.cuda.ops.launch import check_tensor, launch

QUERIES_PER_TILE = 16  # QS_PREFILL_QUERIES in the kernel


def prefill_tiles(query_start_loc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Query tiles (first token, token count) that never cross a sequence boundary.

    query_start_loc: [num_seqs + 1] int -> two [num_tiles] int32 arrays.
    """
    starts = np.asarray(query_start_loc, dtype=np.int64)
    firsts, counts = [], []
    for begin, end in zip(starts[:-1], starts[1:]):
        tile_firsts = np.arange(begin, end, QUERIES_PER_TILE)
        firsts.append(tile_firsts)
        counts.append(np.minimum(end - tile_firsts, QUERIES_PER_TILE))
    if not firsts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(firsts).astype(np.int32), np.concatenate(counts).astype(np.int32)


def launch_attention_prefill(device, q: DeviceTensor, out: DeviceTensor, k_cache: DeviceTensor,
                             v_cache: DeviceTensor, block_tables: DeviceTensor, token_seq: DeviceTensor,
                             positions: DeviceTensor, block_size: int, tile_first_token: DeviceTensor,
                             tile_num_tokens: DeviceTensor) -> None:
    """Same contract as launch_attention_decode; tiles from prefill_tiles (on the device, [num_tiles] int32)."""
    num_tiles = tile_first_token.shape[0]
    check_tensor("tile_first_token", tile_first_token, (num_tiles,), np.int32)
    check_tensor("tile_num_tokens", tile_num_tokens, (num_tiles,), np.int32)
    params = attention_params(q, out, k_cache, v_cache, block_tables, token_seq, positions, block_size,
                              tiles=(tile_first_token, tile_num_tokens))
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    launch(device.kernel("attention_prefill_f32"), (num_tiles, num_kv_heads),
           (32 * (num_heads // num_kv_heads),), device.stream, params)
