// Attention of query tokens over the paged fp16 KV cache, for decode steps and prompt chunks
// alike: one kernel, so a token's output never depends on whether it came in a prefill chunk or
// a decode step, alone or batched. The query at position pos attends to positions [0, pos] of its
// sequence (its own K/V row was written by rope_kv before this launch).
//
// The arithmetic of one (query, head), fixed by the context alone: one warp visits the context in
// tiles of 32 positions, in order, with an online softmax (running max m, running sum l); lane j
// scores position tile_start + j by a fixed-order dot product; each lane accumulates output dims
// 2*lane, 2*lane + 1 over the tile's positions in increasing order.
// Block = (token, kv head), one warp per query head of the GQA group (the group's warps read the
// same K/V rows: L1 hits).
#include "common.cuh"

#define QS_ATTN_HEAD_DIM 64
#define QS_ATTN_TILE 32
#define QS_ATTN_MAX_GROUP 8     // query heads per kv head: block <= 256 threads

// Every field 8 bytes wide (mirrored by ops/attention.py's numpy record).
struct AttentionParams {
    const float* q;             // [num_tokens, num_heads * 64] fp32, RoPE applied
    float* out;                 // [num_tokens, num_heads * 64] fp32
    const __half* k_cache;      // [num_slots, num_kv_heads, 64] fp16
    const __half* v_cache;      // [num_slots, num_kv_heads, 64] fp16
    const int* block_tables;    // [num_seqs, max_blocks_per_seq]
    const int* token_seq;       // [num_tokens] sequence index of each query token
    const int* positions;       // [num_tokens] absolute position; attends to [0, pos]
    long long max_blocks_per_seq;
    long long num_heads;
    long long num_kv_heads;
    long long block_size;
    float scale;
    float pad_;
};

namespace qs {

struct AttnState {
    float m;     // running max of scores (-inf before the first tile)
    float l;     // running sum of exp(score - m)
    float acc0;  // output dim 2*lane, unnormalized
    float acc1;  // output dim 2*lane + 1
};

__device__ __forceinline__ AttnState attn_state_init() {
    AttnState s;
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
__device__ __forceinline__ void attn_tile_update(AttnState& st, const float* q, const __half* k_row,
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

__device__ __forceinline__ void attn_store(const AttnState& st, float* out_head) {
    const int lane = threadIdx.x & 31;
    const float inv_l = 1.0f / st.l;
    reinterpret_cast<float2*>(out_head)[lane] = make_float2(st.acc0 * inv_l, st.acc1 * inv_l);
}

// Slot of absolute position `pos` of a sequence through its block table row.
__device__ __forceinline__ long long paged_slot(const int* block_table_row, int pos, int block_size) {
    return (long long)block_table_row[pos / block_size] * block_size + pos % block_size;
}

}  // namespace qs

// grid = (num_tokens, num_kv_heads), block = (32 * num_heads / num_kv_heads)
extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_MAX_GROUP) attention_f32(const AttentionParams p) {
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
    qs::AttnState st = qs::attn_state_init();
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
