// Causal prefill attention, flash-style: no score matrix in memory. Grid (num_tiles, num_kv_heads);
// a tile is up to 16 consecutive query tokens of one sequence (host-built). The block stages each
// 32-position K/V tile of that sequence in shared memory once for all of the tile's queries and
// the GQA group's heads; warp w owns head kv_head * group + w and updates each query with the
// same per-(query, head) arithmetic as the decode kernel (attention_common.cuh), so outputs do not
// depend on the kernel, the chunking or the batch.
#include "attention_common.cuh"

#define QS_PREFILL_QUERIES 16
#define QS_PREFILL_MAX_GROUP 8
#define QS_K_ROW_STRIDE (QS_ATTN_HEAD_DIM + 8)  // halves; 16-byte pad staggers shared-memory banks

namespace qs {

// Loads positions [start, start + num_rows) of the sequence's K and V for one kv head.
__device__ __forceinline__ void stage_kv_tile(const AttentionParams& p, const int* table, int kv_head,
                                              int start, int num_rows, __half* k_tile, __half* v_tile) {
    constexpr int kChunks = QS_ATTN_HEAD_DIM / 8;  // 16-byte chunks per row
    const int nkv = (int)p.num_kv_heads, bs = (int)p.block_size;
    for (int c = threadIdx.x; c < num_rows * kChunks; c += blockDim.x) {
        const int row = c / kChunks, chunk = c % kChunks;
        const long long slot = paged_slot(table, start + row, bs);
        const size_t src = (size_t)(slot * nkv + kv_head) * QS_ATTN_HEAD_DIM + chunk * 8;
        *reinterpret_cast<uint4*>(k_tile + row * QS_K_ROW_STRIDE + chunk * 8) =
            *reinterpret_cast<const uint4*>(p.k_cache + src);
        *reinterpret_cast<uint4*>(v_tile + row * QS_ATTN_HEAD_DIM + chunk * 8) =
            *reinterpret_cast<const uint4*>(p.v_cache + src);
    }
}

}  // namespace qs

// grid = (num_tiles, num_kv_heads), block = (32 * num_heads / num_kv_heads), group <= 8
extern "C" __global__ void __launch_bounds__(256) attention_prefill_f32(const AttentionParams p) {
    __shared__ __align__(16) float q_tile[QS_PREFILL_QUERIES][QS_PREFILL_MAX_GROUP][QS_ATTN_HEAD_DIM];
    __shared__ __align__(16) __half k_tile[QS_ATTN_TILE * QS_K_ROW_STRIDE];
    __shared__ __align__(16) __half v_tile[QS_ATTN_TILE * QS_ATTN_HEAD_DIM];
    const int kv_head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int group = (int)(p.num_heads / p.num_kv_heads);
    const int head = kv_head * group + warp;
    const int first = p.tile_first_token[blockIdx.x], num_q = p.tile_num_tokens[blockIdx.x];
    const int* table = p.block_tables + (size_t)p.token_seq[first] * p.max_blocks_per_seq;
    int context_max = 0;
    for (int i = 0; i < num_q; ++i) context_max = max(context_max, p.positions[first + i] + 1);
    for (int i = threadIdx.x; i < num_q * group * QS_ATTN_HEAD_DIM; i += blockDim.x) {
        const int qi = i / (group * QS_ATTN_HEAD_DIM), rest = i % (group * QS_ATTN_HEAD_DIM);
        const int h = rest / QS_ATTN_HEAD_DIM, d = rest % QS_ATTN_HEAD_DIM;
        q_tile[qi][h][d] = p.q[((size_t)(first + qi) * p.num_heads + kv_head * group + h) * QS_ATTN_HEAD_DIM + d];
    }
    qs::WarpAttnState st[QS_PREFILL_QUERIES];
#pragma unroll
    for (int qi = 0; qi < QS_PREFILL_QUERIES; ++qi) st[qi] = qs::attn_state_init();
    for (int start = 0; start < context_max; start += QS_ATTN_TILE) {
        __syncthreads();  // previous tile fully consumed (and q_tile written, first time)
        qs::stage_kv_tile(p, table, kv_head, start, min(QS_ATTN_TILE, context_max - start), k_tile, v_tile);
        __syncthreads();
#pragma unroll
        for (int qi = 0; qi < QS_PREFILL_QUERIES; ++qi) {
            if (qi >= num_q) break;
            const int context_len = p.positions[first + qi] + 1;
            if (start >= context_len) continue;  // the decode kernel stops before this tile too
            const int num_valid = min(QS_ATTN_TILE, context_len - start);
            qs::attn_tile_update(st[qi], q_tile[qi][warp], k_tile + lane * QS_K_ROW_STRIDE,
                                 v_tile + lane * QS_ATTN_HEAD_DIM, num_valid, p.scale);
        }
    }
#pragma unroll
    for (int qi = 0; qi < QS_PREFILL_QUERIES; ++qi) {
        if (qi < num_q) qs::attn_store(st[qi], p.out + ((size_t)(first + qi) * p.num_heads + head) * QS_ATTN_HEAD_DIM);
    }
}
