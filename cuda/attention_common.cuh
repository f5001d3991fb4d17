// The per-(query, head) attention arithmetic shared by the decode and prefill kernels, so that a
// query gets bitwise the same output whichever kernel runs it (prompt chunking and batch
// invariance). One warp owns one (query, head): KV positions are visited in tiles of 32 in
// increasing order; lane j scores position tile_start + j; softmax is online (running max m,
// running sum l); each lane accumulates two output dims (2*lane, 2*lane + 1) over the tile's
// positions in increasing order. Nothing depends on the batch, the chunk or the kernel.
#pragma once
#include "common.cuh"

#define QS_ATTN_HEAD_DIM 64
#define QS_ATTN_TILE 32

namespace qs {

struct WarpAttnState {
    float m;     // running max of scores (-inf before the first tile)
    float l;     // running sum of exp(score - m)
    float acc0;  // output dim 2*lane, unnormalized
    float acc1;  // output dim 2*lane + 1
};

__device__ __forceinline__ WarpAttnState attn_state_init() {
    WarpAttnState s;
    s.m = -INFINITY; s.l = 0.0f; s.acc0 = 0.0f; s.acc1 = 0.0f;
    return s;
}

// q: [64] fp32 (registers or shared memory), k_row: [64] fp16 (16-byte aligned). Fixed order.
__device__ __forceinline__ float dot_q_k(const float* q, const __half* k_row) {
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < QS_ATTN_HEAD_DIM; c += 8) {
        float k8[8];
        load_half8(k_row + c, k8);
#pragma unroll
        for (int i = 0; i < 8; ++i) sum = fmaf(q[c + i], k8[i], sum);
    }
    return sum;
}

// One tile of up to 32 positions; `num_valid` (1..32, warp-uniform) of them are < context length.
// Lane j holds k_row / v_row of position tile_start + j (ignored when j >= num_valid).
__device__ __forceinline__ void attn_tile_update(WarpAttnState& st, const float* q, const __half* k_row,
                                                 const __half* v_row, int num_valid, float scale) {
    const int lane = threadIdx.x & 31;
    const float score = lane < num_valid ? dot_q_k(q, k_row) * scale : -INFINITY;
    const float m_new = fmaxf(st.m, warp_max(score));
    const float correction = expf(st.m - m_new);  // 0 on the first tile (m = -inf)
    const float p = lane < num_valid ? expf(score - m_new) : 0.0f;
    st.l = st.l * correction + warp_sum(p);
    st.acc0 *= correction;
    st.acc1 *= correction;
    const unsigned long long v_addr = reinterpret_cast<unsigned long long>(v_row);
    if (num_valid == QS_ATTN_TILE) {
        // A full tile: all 32 V loads in flight before the first FMA (the loop below waits for
        // each load in turn). The FMAs run in the same order, so the result is bitwise the same.
        __half2 v[QS_ATTN_TILE];
#pragma unroll
        for (int j = 0; j < QS_ATTN_TILE; ++j) {
            const __half* vj = reinterpret_cast<const __half*>(__shfl_sync(0xffffffffu, v_addr, j));
            v[j] = reinterpret_cast<const __half2*>(vj)[lane];
        }
#pragma unroll
        for (int j = 0; j < QS_ATTN_TILE; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const float2 v2 = __half22float2(v[j]);
            st.acc0 = fmaf(pj, v2.x, st.acc0);
            st.acc1 = fmaf(pj, v2.y, st.acc1);
        }
    } else {
        for (int j = 0; j < num_valid; ++j) {
            const float pj = __shfl_sync(0xffffffffu, p, j);
            const __half* vj = reinterpret_cast<const __half*>(__shfl_sync(0xffffffffu, v_addr, j));
            const float2 v2 = __half22float2(reinterpret_cast<const __half2*>(vj)[lane]);
            st.acc0 = fmaf(pj, v2.x, st.acc0);
            st.acc1 = fmaf(pj, v2.y, st.acc1);
        }
    }
    st.m = m_new;
}

__device__ __forceinline__ void attn_store(const WarpAttnState& st, float* out_head) {
    const int lane = threadIdx.x & 31;
    const float inv_l = 1.0f / st.l;
    reinterpret_cast<float2*>(out_head)[lane] = make_float2(st.acc0 * inv_l, st.acc1 * inv_l);
}

// Slot of absolute position `pos` of a sequence through its block table row.
__device__ __forceinline__ long long paged_slot(const int* block_table_row, int pos, int block_size) {
    return (long long)block_table_row[pos / block_size] * block_size + pos % block_size;
}

}  // namespace qs

// Shared by both attention kernels; every field 8 bytes wide (mirrored by a numpy record).
struct AttentionParams {
    const float* q;             // [num_tokens, num_heads * 64] fp32, RoPE applied
    float* out;                 // [num_tokens, num_heads * 64] fp32
    const __half* k_cache;      // [num_slots, num_kv_heads, 64] fp16
    const __half* v_cache;      // [num_slots, num_kv_heads, 64] fp16
    const int* block_tables;    // [num_seqs, max_blocks_per_seq]
    const int* token_seq;       // [num_tokens] sequence index of each query token
    const int* positions;       // [num_tokens] absolute position; attends to [0, pos]
    const int* tile_first_token;  // prefill only: [num_tiles] first token of each query tile
    const int* tile_num_tokens;   // prefill only: [num_tiles] tokens in the tile (same sequence)
    long long max_blocks_per_seq;
    long long num_heads;
    long long num_kv_heads;
    long long block_size;
    float scale;
    float pad_;
};
