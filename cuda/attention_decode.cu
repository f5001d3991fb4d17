// Attention for any query token over the paged KV cache (used for decode steps: one token per
// sequence). Grid (num_tokens, num_kv_heads); block = one warp per query head of the GQA group,
// so the group's warps read the same K/V rows (L1 hits). The query at position pos attends to
// positions [0, pos] of its sequence (its own KV was written by rope_kv before this launch).
#include "attention_common.cuh"

// grid = (num_tokens, num_kv_heads), block = (32 * num_heads / num_kv_heads)
extern "C" __global__ void __launch_bounds__(256) attention_decode_f32(const AttentionParams p) {
    const int t = blockIdx.x, kv_head = blockIdx.y;
    const int group = (int)(p.num_heads / p.num_kv_heads);
    const int head = kv_head * group + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    const int nkv = (int)p.num_kv_heads, bs = (int)p.block_size;
    const int context_len = p.positions[t] + 1;
    const int* table = p.block_tables + (size_t)p.token_seq[t] * p.max_blocks_per_seq;
    const float* q_src = p.q + ((size_t)t * p.num_heads + head) * QS_ATTN_HEAD_DIM;
    float q[QS_ATTN_HEAD_DIM];
#pragma unroll
    for (int i = 0; i < QS_ATTN_HEAD_DIM; i += 4) {
        const float4 v = reinterpret_cast<const float4*>(q_src)[i / 4];
        q[i] = v.x; q[i + 1] = v.y; q[i + 2] = v.z; q[i + 3] = v.w;
    }
    qs::WarpAttnState st = qs::attn_state_init();
    for (int start = 0; start < context_len; start += QS_ATTN_TILE) {
        const int num_valid = min(QS_ATTN_TILE, context_len - start);
        const __half* k_row = p.k_cache;
        const __half* v_row = p.v_cache;
        if (lane < num_valid) {
            const long long slot = qs::paged_slot(table, start + lane, bs);
            k_row = p.k_cache + (slot * nkv + kv_head) * QS_ATTN_HEAD_DIM;
            v_row = p.v_cache + (slot * nkv + kv_head) * QS_ATTN_HEAD_DIM;
        }
        qs::attn_tile_update(st, q, k_row, v_row, num_valid, p.scale);
    }
    qs::attn_store(st, p.out + ((size_t)t * p.num_heads + head) * QS_ATTN_HEAD_DIM);
}
