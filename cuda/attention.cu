// Attention of query tokens over the paged fp16 KV cache, for decode steps and prompt chunks
// alike: one arithmetic, so a token's output never depends on whether it came in a prefill chunk
// or a decode step, alone or batched. Two kernels run it: attention_f32 (a block per token) and
// attention_tiles_f32 (prompt chunks, a block per few consecutive tokens; at the end of the file).
// The query at position pos attends to positions [0, pos] of its sequence (its own K/V row was
// written by rope_kv before this launch).
//
// The arithmetic of one (query, head), fixed by the context length alone:
// - the context is cut into tiles of 32 positions; tile i belongs to split s = i % 4;
// - each split runs an online softmax (running max m, running sum l) over its tiles in increasing
//   order: lane j scores position tile_start + j by a fixed-order dot product, and each lane
//   accumulates output dims 2*lane, 2*lane + 1 over the tile's positions in increasing order;
// - the four split states are merged in split order, ((s0 + s1) + s2) + s3, then normalized.
// One warp per (query head, split): the 4 splits run side by side. (A single warp walking all
// tiles issued one dependent instruction every ~11 cycles: ~1.8 us per tile at batch 1.)
//
// Block = (token, `heads_per_block` query heads of one GQA group): 4 warps per query head. They all
// need the same K/V rows, so the block stages them once in shared memory, one round of 4 tiles
// (128 positions) at a time with cp.async, the next round in flight while this one is scored.
// heads_per_block is the whole group (7) when there are tokens enough to fill the GPU: the K/V
// rows are read once per group. With few tokens (decode at small batches) it is 1: 14 small blocks
// spread over 14 multiprocessors instead of 2 big ones whose 28 warps queue for 2 multiprocessors'
// issue slots (ops/attention.py picks; ~10% faster at 1-16 tokens, 3x slower at 64).
// Neither where a tile comes from nor which block runs a head changes a value or an order of
// operations: the output is bitwise the same for every heads_per_block.
//
// Decode steps (rope_fused): every token is the newest of its sequence, so the only K/V row it
// needs that is not in the cache yet is its own. The kernel then also does rope_kv.cu's work
// (one launch fewer per layer): it reads q, k, v unrotated from the q/k/v launches' rows, applies
// bias + RoPE (qs::rope_pair, rope_kv's arithmetic), puts its own K/V row straight into the staged
// round instead of copying it from the cache, and the block holding the GQA group's first head
// writes that row to the cache (slot < 0: padding, no write). Prompt chunks need each other's
// rows in the cache first: they run rope_kv, then this kernel with rope_fused = 0.
#include "common.cuh"

#define QS_ATTN_HEAD_DIM 64
#define QS_ATTN_TILE 32
#define QS_ATTN_SPLIT 4                                   // warps per query head; tile i -> split i % 4
#define QS_ATTN_ROUND (QS_ATTN_SPLIT * QS_ATTN_TILE)      // positions staged together: 128
#define QS_ATTN_MAX_GROUP 8                               // query heads per kv head: block <= 1024 threads
#define QS_ATTN_ROW 72          // halves per staged row: 64 + 8 of padding, so the 16-byte loads of
                                // lanes reading 32 different rows spread over the banks
// Dynamic shared memory: two rounds of K rows, then two of V rows (mirrored by ops/attention.py).
#define QS_ATTN_SHARED_BYTES (2 * 2 * QS_ATTN_ROUND * QS_ATTN_ROW * 2)

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
    long long heads_per_block;  // query heads per block: divides num_heads / num_kv_heads
    float scale;
    float pad_;
    // Decode steps only (rope_fused != 0; q is then unused): rope_kv's inputs, see RopeKvParams.
    const float* q_in;          // [num_tokens, q_in_stride] unrotated q
    const float* k_in;          // [num_tokens, kv_in_stride] unrotated k
    const float* v_in;          // [num_tokens, kv_in_stride]
    const float* bias_q;
    const float* bias_k;
    const float* bias_v;
    const float* cos_table;     // [max_positions, 32]
    const float* sin_table;
    const int* slot_mapping;    // [num_tokens]; < 0: no KV write
    long long q_in_stride;
    long long kv_in_stride;
    long long rope_fused;
    __half* out16;              // [num_tokens, num_heads * 64] fp16 in slot order (o's input), or null
};

namespace qs {

typedef __half AttnRow[QS_ATTN_ROW];

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

// q: [64] fp32 in shared memory (every lane reads the same value: a broadcast), k_row: [64] fp16
// in shared memory (16-byte aligned). Fixed order: one FMA chain over dims 0..63.
__device__ __forceinline__ float dot_q_k(const float* q, const __half* k_row) {
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < QS_ATTN_HEAD_DIM; c += 8) {
        float k8[8];
        load_half8(k_row + c, k8);
        const float4 qa = *reinterpret_cast<const float4*>(q + c);
        const float4 qb = *reinterpret_cast<const float4*>(q + c + 4);
        sum = fmaf(qa.x, k8[0], sum); sum = fmaf(qa.y, k8[1], sum);
        sum = fmaf(qa.z, k8[2], sum); sum = fmaf(qa.w, k8[3], sum);
        sum = fmaf(qb.x, k8[4], sum); sum = fmaf(qb.y, k8[5], sum);
        sum = fmaf(qb.z, k8[6], sum); sum = fmaf(qb.w, k8[7], sum);
    }
    return sum;
}

// acc += p_j * V[j] (lane's two dims): position j of a tile, taken in increasing j.
__device__ __forceinline__ void attn_accumulate_v(AttnState& st, float p, const AttnRow v_row, int j, int lane) {
    const float pj = __shfl_sync(0xffffffffu, p, j);
    const float2 v2 = __half22float2(reinterpret_cast<const __half2*>(v_row)[lane]);
    st.acc0 = fmaf(pj, v2.x, st.acc0);
    st.acc1 = fmaf(pj, v2.y, st.acc1);
}

// The online-softmax step of one tile, shared by both kernels: this lane's raw dot product
// `dot` (position tile_start + lane; `num_valid` (1..32, warp-uniform) positions are < context
// length) -> its weight p; m, l and the accumulators rescaled. The p * V sums follow.
__device__ __forceinline__ float attn_softmax_step(AttnState& st, float dot, int num_valid, float scale) {
    const int lane = threadIdx.x & 31;
    const float score = lane < num_valid ? dot * scale : -INFINITY;
    const float m_new = fmaxf(st.m, warp_max(score));
    const float correction = expf(st.m - m_new);  // 0 on the first tile (m = -inf)
    const float p = lane < num_valid ? expf(score - m_new) : 0.0f;
    st.l = st.l * correction + warp_sum(p);
    st.acc0 *= correction;
    st.acc1 *= correction;
    st.m = m_new;
    return p;
}

// One tile of up to 32 positions, one query. k_tile / v_tile: the tile's rows in shared memory
// (row j = position tile_start + j); rows past num_valid hold stale bytes and are never read.
__device__ __forceinline__ void attn_tile_update(AttnState& st, const float* q, const AttnRow* k_tile,
                                                 const AttnRow* v_tile, int num_valid, float scale) {
    const int lane = threadIdx.x & 31;
    const float p = attn_softmax_step(st, lane < num_valid ? dot_q_k(q, k_tile[lane]) : 0.0f, num_valid, scale);
    if (num_valid == QS_ATTN_TILE) {   // every tile but a context's last: no per-position checks
#pragma unroll
        for (int j = 0; j < QS_ATTN_TILE; ++j) attn_accumulate_v(st, p, v_tile[j], j, lane);
    } else {
        for (int j = 0; j < num_valid; ++j) attn_accumulate_v(st, p, v_tile[j], j, lane);
    }
}

// The same tile for the QT consecutive queries of a query tile (attention_tiles_f32): query i
// (i < n) sees first_valid + i positions of it (<= 0: none, its state is untouched; >= 32: all).
// Per query every operation is attn_tile_update's, in its order; the queries only share the K/V
// loads and conversions and run side by side (QT independent chains). The weights p go through
// the warp's p_rows ([QT][32] floats in shared memory) instead of shuffles: the same values,
// read four positions per load.
template <int QT>
__device__ __forceinline__ void attn_tile_update_queries(AttnState (&st)[QT], const float* q, int q_stride,
                                                         const AttnRow* k_tile, const AttnRow* v_tile,
                                                         int first_valid, int n, float scale, float* p_rows) {
    const int lane = threadIdx.x & 31;
    float dot[QT];
#pragma unroll
    for (int i = 0; i < QT; ++i) dot[i] = 0.0f;
#pragma unroll
    for (int c = 0; c < QS_ATTN_HEAD_DIM; c += 8) {   // dot_q_k's chain, once per query
        float k8[8];
        load_half8(k_tile[lane] + c, k8);
#pragma unroll
        for (int i = 0; i < QT; ++i) {
            const float4 qa = *reinterpret_cast<const float4*>(q + i * q_stride + c);
            const float4 qb = *reinterpret_cast<const float4*>(q + i * q_stride + c + 4);
            float sum = dot[i];
            sum = fmaf(qa.x, k8[0], sum); sum = fmaf(qa.y, k8[1], sum);
            sum = fmaf(qa.z, k8[2], sum); sum = fmaf(qa.w, k8[3], sum);
            sum = fmaf(qb.x, k8[4], sum); sum = fmaf(qb.y, k8[5], sum);
            sum = fmaf(qb.z, k8[6], sum); sum = fmaf(qb.w, k8[7], sum);
            dot[i] = sum;
        }
    }
#pragma unroll
    for (int i = 0; i < QT; ++i) {
        const int num_valid = min(QS_ATTN_TILE, first_valid + i);
        if (i < n && num_valid > 0)
            p_rows[i * QS_ATTN_TILE + lane] = attn_softmax_step(st[i], lane < num_valid ? dot[i] : 0.0f, num_valid, scale);
    }
    __syncwarp();
    if (first_valid >= QS_ATTN_TILE) {   // every query sees the whole tile
#pragma unroll
        for (int j = 0; j < QS_ATTN_TILE; j += 4) {
            float2 v[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) v[r] = __half22float2(reinterpret_cast<const __half2*>(v_tile[j + r])[lane]);
#pragma unroll
            for (int i = 0; i < QT; ++i) {
                if (i >= n) continue;
                const float4 p4 = *reinterpret_cast<const float4*>(p_rows + i * QS_ATTN_TILE + j);
                const float pj[4] = {p4.x, p4.y, p4.z, p4.w};
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    st[i].acc0 = fmaf(pj[r], v[r].x, st[i].acc0);
                    st[i].acc1 = fmaf(pj[r], v[r].y, st[i].acc1);
                }
            }
        }
    } else {                             // the diagonal: each query up to its own position
        const int last_valid = min(QS_ATTN_TILE, first_valid + n - 1);
        for (int j = 0; j < last_valid; ++j) {
            const float2 v = __half22float2(reinterpret_cast<const __half2*>(v_tile[j])[lane]);
#pragma unroll
            for (int i = 0; i < QT; ++i) {
                if (i < n && j < first_valid + i) {
                    const float pj = p_rows[i * QS_ATTN_TILE + j];
                    st[i].acc0 = fmaf(pj, v.x, st[i].acc0);
                    st[i].acc1 = fmaf(pj, v.y, st[i].acc1);
                }
            }
        }
    }
}

// a <- a merged with state b (m_b = -inf: b saw no tile, and a is unchanged in value).
// a.m is finite: split 0 always holds tile 0. The roundings are spelled out: left to contraction,
// x * ca + y * cb became an fma of either product depending on the kernel around it (the two
// kernels here differed by an ulp).
__device__ __forceinline__ void attn_merge(AttnState& a, float m_b, float l_b, float acc0_b, float acc1_b) {
    const float m = fmaxf(a.m, m_b);
    const float ca = expf(a.m - m), cb = expf(m_b - m);
    a.l = fmaf(a.l, ca, __fmul_rn(l_b, cb));
    a.acc0 = fmaf(a.acc0, ca, __fmul_rn(acc0_b, cb));
    a.acc1 = fmaf(a.acc1, ca, __fmul_rn(acc1_b, cb));
    a.m = m;
}

// Output columns 2 lane, 2 lane + 1 of head `head` of token t: fp32, and fp16 in slot order where
// p.out16 asks for it (a column pair is one 32-bit word there too).
__device__ __forceinline__ void attn_store(const AttnState& st, const AttentionParams& p, size_t t, int head) {
    const int lane = threadIdx.x & 31;
    const float inv_l = 1.0f / st.l;
    const float lo = st.acc0 * inv_l, hi = st.acc1 * inv_l;
    const size_t row = t * p.num_heads * QS_ATTN_HEAD_DIM;
    const int col = head * QS_ATTN_HEAD_DIM + 2 * lane;
    reinterpret_cast<float2*>(p.out + row + col)[0] = make_float2(lo, hi);
    if (p.out16) *reinterpret_cast<__half2*>(p.out16 + row + slot_position(col)) = __floats2half2_rn(lo, hi);
}

// Slot of absolute position `pos` of a sequence through its block table row.
__device__ __forceinline__ long long paged_slot(const int* block_table_row, int pos, int block_size) {
    return (long long)block_table_row[pos / block_size] * block_size + pos % block_size;
}

// Decode steps: this token's own K/V row (position own_pos), biased and rotated from k_in / v_in,
// into its staged rows, and by the writer block into the cache as rope_kv.cu would.
__device__ __forceinline__ void attn_own_kv_row(const AttentionParams& p, int t, int kv_head, int own_pos,
                                                bool writer, __half* k_row, __half* v_row) {
    constexpr int kHalf = QS_ATTN_HEAD_DIM / 2;
    const int slot = p.slot_mapping[t];
    const long long dst = ((long long)slot * p.num_kv_heads + kv_head) * QS_ATTN_HEAD_DIM;
    __half* k_cache = const_cast<__half*>(p.k_cache);
    __half* v_cache = const_cast<__half*>(p.v_cache);
    const int base = kv_head * QS_ATTN_HEAD_DIM;
    for (int i = threadIdx.x; i < kHalf + QS_ATTN_HEAD_DIM; i += blockDim.x) {
        if (i < kHalf) {   // K pair (i, i + 32)
            float x0, x1;
            rope_pair(p.k_in + (size_t)t * p.kv_in_stride, p.bias_k, base, i, kHalf,
                      p.cos_table[(size_t)own_pos * kHalf + i], p.sin_table[(size_t)own_pos * kHalf + i], &x0, &x1);
            const __half h0 = __float2half_rn(x0), h1 = __float2half_rn(x1);
            k_row[i] = h0;
            k_row[i + kHalf] = h1;
            if (writer && slot >= 0) { k_cache[dst + i] = h0; k_cache[dst + i + kHalf] = h1; }
        } else {           // V element j
            const int j = i - kHalf;
            const __half h = biased_v_half(p.v_in + (size_t)t * p.kv_in_stride, p.bias_v, base + j);
            v_row[j] = h;
            if (writer && slot >= 0) v_cache[dst + j] = h;
        }
    }
}

// Issues (and commits, as one cp.async group) the copies of round `round`'s K and V rows of
// kv_head (positions [128 * round, 128 * round + 128) of the context) into one stage; positions
// past the context are skipped. Threads 2r and 2r + 1 stage row r: each reads the row's cache
// offset through the block table itself (no shared table, no barrier) and copies 4 of its 8
// 16-byte K pieces and 4 of its V pieces, neighbours taking neighbouring pieces so that each copy
// instruction of a warp reads whole 32-byte sectors. A thread's (at most 2) table reads are all
// issued before its first copy: the cp.async asm orders memory for the compiler, so a read placed
// after one would wait for it. (The generic strided loop this replaces spent ~44% of a batch-1
// launch's instructions on index arithmetic; ncu, session 7.)
// Decode steps: the token's own row (the context's last) comes from attn_own_kv_row, not the cache.
__device__ __forceinline__ void attn_stage_round(const AttentionParams& p, const int* table, int kv_head,
                                                 int context_len, int round, AttnRow* k_stage, AttnRow* v_stage,
                                                 int t, bool writer) {
    constexpr int kPairs = 2 * QS_ATTN_ROUND;   // (row, half) pairs: <= 2 per thread (blockDim >= 128)
    const int start = round * QS_ATTN_ROUND;
    const int own_pos = p.rope_fused ? context_len - 1 : -1;
    long long offsets[2];
#pragma unroll
    for (int it = 0; it < 2; ++it) {
        const int i = threadIdx.x + it * blockDim.x, pos = start + (i >> 1);
        offsets[it] = i < kPairs && pos < context_len && pos != own_pos
            ? (paged_slot(table, pos, (int)p.block_size) * p.num_kv_heads + kv_head) * QS_ATTN_HEAD_DIM : -1;
    }
#pragma unroll
    for (int it = 0; it < 2; ++it) {
        if (offsets[it] < 0) continue;
        const int i = threadIdx.x + it * blockDim.x, row = i >> 1, half = i & 1;
        const __half* k_src = p.k_cache + offsets[it];
        const __half* v_src = p.v_cache + offsets[it];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            const int piece = 2 * k + half;
            cp_async16(k_stage[row] + 8 * piece, k_src + 8 * piece);
            cp_async16(v_stage[row] + 8 * piece, v_src + 8 * piece);
        }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    if (own_pos >= start && own_pos < start + QS_ATTN_ROUND)
        attn_own_kv_row(p, t, kv_head, own_pos, writer, k_stage[own_pos - start], v_stage[own_pos - start]);
}

// attention_f32's body: one block per (token, heads_per_block query heads).
__device__ __forceinline__ void attention_one_token(const AttentionParams& p) {
    extern __shared__ __align__(16) uint8_t attn_smem[];
    __shared__ __align__(16) float q_heads[QS_ATTN_MAX_GROUP][QS_ATTN_HEAD_DIM];
    qs::AttnRow* k_stages = reinterpret_cast<qs::AttnRow*>(attn_smem);           // [2][128]
    qs::AttnRow* v_stages = k_stages + 2 * QS_ATTN_ROUND;                         // [2][128]
    const int t = blockIdx.x;
    const int group = (int)(p.num_heads / p.num_kv_heads);
    const int first_head = blockIdx.y * (int)p.heads_per_block, kv_head = first_head / group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int head_in_block = warp / QS_ATTN_SPLIT, split = warp % QS_ATTN_SPLIT;
    const int head = first_head + head_in_block;
    const int context_len = p.positions[t] + 1;
    const int num_tiles = (context_len + QS_ATTN_TILE - 1) / QS_ATTN_TILE;
    const int num_rounds = (context_len + QS_ATTN_ROUND - 1) / QS_ATTN_ROUND;
    const int* table = p.block_tables + (size_t)p.token_seq[t] * p.max_blocks_per_seq;
    const bool writer = first_head % group == 0;   // decode steps: this block writes the KV row
    qs::attn_stage_round(p, table, kv_head, context_len, 0, k_stages, v_stages, t, writer);
    if (p.rope_fused) {   // q = rope(q_in + bias_q): pair i of each of the block's heads
        constexpr int kHalf = QS_ATTN_HEAD_DIM / 2;
        const int pos = context_len - 1;
        for (int i = threadIdx.x; i < (int)p.heads_per_block * kHalf; i += blockDim.x) {
            const int h = i / kHalf, j = i % kHalf;
            qs::rope_pair(p.q_in + (size_t)t * p.q_in_stride, p.bias_q, (first_head + h) * QS_ATTN_HEAD_DIM, j, kHalf,
                          p.cos_table[(size_t)pos * kHalf + j], p.sin_table[(size_t)pos * kHalf + j],
                          &q_heads[h][j], &q_heads[h][j + kHalf]);
        }
    } else {
        const float* q_block = p.q + ((size_t)t * p.num_heads + first_head) * QS_ATTN_HEAD_DIM;
        for (int i = threadIdx.x; i < (int)p.heads_per_block * QS_ATTN_HEAD_DIM / 4; i += blockDim.x)
            reinterpret_cast<float4*>(&q_heads[0][0])[i] = reinterpret_cast<const float4*>(q_block)[i];
    }
    qs::AttnState st = qs::attn_state_init();
    for (int round = 0; round < num_rounds; ++round) {
        // Round + 1 goes to the stage round - 1 used; the barrier ending round - 1 freed it.
        if (round + 1 < num_rounds) {
            const int next = (round + 1) & 1;
            qs::attn_stage_round(p, table, kv_head, context_len, round + 1, k_stages + next * QS_ATTN_ROUND,
                                 v_stages + next * QS_ATTN_ROUND, t, writer);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");   // this round's group is done
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();                                              // everyone's copies (and q)
        const int tile = round * QS_ATTN_SPLIT + split;
        if (tile < num_tiles) {
            const int stage_row = (round & 1) * QS_ATTN_ROUND + split * QS_ATTN_TILE;
            qs::attn_tile_update(st, q_heads[head_in_block], k_stages + stage_row, v_stages + stage_row,
                                 min(QS_ATTN_TILE, context_len - tile * QS_ATTN_TILE), p.scale);
        }
        __syncthreads();
    }
    // Splits 1..3 hand their states to split 0 through the (now free) stage memory.
    float* states = reinterpret_cast<float*>(attn_smem);   // [heads_per_block][split][2 + 64]
    float* mine = states + (head_in_block * QS_ATTN_SPLIT + split) * (2 + QS_ATTN_HEAD_DIM);
    if (split > 0) {
        if (lane == 0) { mine[0] = st.m; mine[1] = st.l; }
        mine[2 + 2 * lane] = st.acc0;
        mine[3 + 2 * lane] = st.acc1;
    }
    __syncthreads();
    if (split == 0) {
#pragma unroll
        for (int s = 1; s < QS_ATTN_SPLIT; ++s) {
            const float* other = mine + s * (2 + QS_ATTN_HEAD_DIM);
            qs::attn_merge(st, other[0], other[1], other[2 + 2 * lane], other[3 + 2 * lane]);
        }
        qs::attn_store(st, p, t, head);
    }
}

}  // namespace qs

// grid = (num_tokens, num_heads / heads_per_block), block = 32 * 4 * heads_per_block,
// dynamic shared memory QS_ATTN_SHARED_BYTES.
extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_SPLIT * QS_ATTN_MAX_GROUP) attention_f32(const AttentionParams p) {
    qs::attention_one_token(p);
}

// The same with at most 32 registers per thread, so that two blocks of a GQA group of 7 heads
// (896 threads) share a multiprocessor: for grids of more blocks than multiprocessors (decode
// steps of more than 66 sequences on an H200's 132). Batch 256, H200: 4.07 -> 3.85 ms per decode
// step; where the grid fits the GPU once (batch 1, 64) the register cap made steps ~1% slower.
// Same arithmetic (GPU test).
extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_SPLIT * QS_ATTN_MAX_GROUP, 2)
attention_f32_two_blocks_per_sm(const AttentionParams p) {
    qs::attention_one_token(p);
}

// Prompt chunks: a block per (query tile, heads_per_block query heads of one GQA group). A query
// tile is up to QS_ATTN_QUERIES consecutive tokens of one sequence at consecutive positions: the
// tokens from an aligned index t0 (t0 % QS_ATTN_QUERIES == 0) or from the start of such a run, up
// to the next aligned index or the run's end. The block stages the K/V rows of the tile's longest
// context once for all of its queries, and each warp (head, split) runs its tiles for every query
// at once (attn_tile_update_queries): per (query, head) the arithmetic is attention_f32's, so the
// output is bitwise the same (GPU tests), with ~QT times fewer staging and K/V load instructions
// and QT independent chains per warp. (attention_f32 on a 512-token prompt: 37 M instructions at
// 0.5 issued per scheduler cycle, ncu, H200.)
// grid = (num_tokens, num_heads / heads_per_block): block x serves the tile starting at token
// num_tokens - 1 - x, if one does (the others return at once), so the longest contexts start first.
// block = 32 * 4 * heads_per_block (heads_per_block <= QS_ATTN_TILE_MAX_HEADS); dynamic shared
// memory QS_ATTN_SHARED_BYTES. rope_fused must be 0: the K/V rows are all in the cache.
#define QS_ATTN_QUERIES 4
#define QS_ATTN_TILE_MAX_HEADS 7

extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_SPLIT * QS_ATTN_TILE_MAX_HEADS)
attention_tiles_f32(const AttentionParams p) {
    constexpr int QT = QS_ATTN_QUERIES;
    extern __shared__ __align__(16) uint8_t attn_smem[];
    __shared__ __align__(16) float q_tile[QT][QS_ATTN_TILE_MAX_HEADS][QS_ATTN_HEAD_DIM];
    __shared__ __align__(16) float p_tile[QS_ATTN_TILE_MAX_HEADS * QS_ATTN_SPLIT][QT * QS_ATTN_TILE];
    qs::AttnRow* k_stages = reinterpret_cast<qs::AttnRow*>(attn_smem);           // [2][128]
    qs::AttnRow* v_stages = k_stages + 2 * QS_ATTN_ROUND;                         // [2][128]
    const int num_tokens = gridDim.x;
    const int t0 = num_tokens - 1 - blockIdx.x;
    const int seq = p.token_seq[t0], pos0 = p.positions[t0];
    const bool run_start = t0 == 0 || p.token_seq[t0 - 1] != seq || p.positions[t0 - 1] != pos0 - 1;
    if (t0 % QT != 0 && !run_start) return;   // inside another block's tile
    int n = 1;
    while (n < QT && t0 + n < num_tokens && (t0 + n) % QT != 0 && p.token_seq[t0 + n] == seq
           && p.positions[t0 + n] == pos0 + n)
        ++n;
    const int group = (int)(p.num_heads / p.num_kv_heads);
    const int first_head = blockIdx.y * (int)p.heads_per_block, kv_head = first_head / group;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int head_in_block = warp / QS_ATTN_SPLIT, split = warp % QS_ATTN_SPLIT;
    const int head = first_head + head_in_block;
    const int first_context = pos0 + 1;                  // query i's context: first_context + i
    const int last_context = first_context + n - 1;
    const int num_rounds = (last_context + QS_ATTN_ROUND - 1) / QS_ATTN_ROUND;
    const int* table = p.block_tables + (size_t)seq * p.max_blocks_per_seq;
    qs::attn_stage_round(p, table, kv_head, last_context, 0, k_stages, v_stages, t0, false);
    {
        const int per_query = (int)p.heads_per_block * QS_ATTN_HEAD_DIM / 4;   // float4s
        for (int i = threadIdx.x; i < n * per_query; i += blockDim.x) {
            const int query = i / per_query, r = i % per_query;
            const float* q_block = p.q + ((size_t)(t0 + query) * p.num_heads + first_head) * QS_ATTN_HEAD_DIM;
            reinterpret_cast<float4*>(&q_tile[query][0][0])[r] = reinterpret_cast<const float4*>(q_block)[r];
        }
    }
    qs::AttnState st[QT];
#pragma unroll
    for (int i = 0; i < QT; ++i) st[i] = qs::attn_state_init();
    for (int round = 0; round < num_rounds; ++round) {
        if (round + 1 < num_rounds) {
            const int next = (round + 1) & 1;
            qs::attn_stage_round(p, table, kv_head, last_context, round + 1, k_stages + next * QS_ATTN_ROUND,
                                 v_stages + next * QS_ATTN_ROUND, t0, false);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        const int tile = round * QS_ATTN_SPLIT + split;
        if (tile * QS_ATTN_TILE < last_context) {
            const int stage_row = (round & 1) * QS_ATTN_ROUND + split * QS_ATTN_TILE;
            qs::attn_tile_update_queries<QT>(st, &q_tile[0][head_in_block][0], QS_ATTN_TILE_MAX_HEADS * QS_ATTN_HEAD_DIM,
                                             k_stages + stage_row, v_stages + stage_row,
                                             first_context - tile * QS_ATTN_TILE, n, p.scale, p_tile[warp]);
        }
        __syncthreads();
    }
    // Splits 1..3 hand their states to split 0 through the (now free) stage memory.
    float* states = reinterpret_cast<float*>(attn_smem);   // [heads_per_block][split][QT][2 + 64]
    constexpr int kState = 2 + QS_ATTN_HEAD_DIM;
    float* mine = states + (head_in_block * QS_ATTN_SPLIT + split) * QT * kState;
    if (split > 0) {
#pragma unroll
        for (int i = 0; i < QT; ++i) {
            if (i >= n) continue;
            if (lane == 0) { mine[i * kState] = st[i].m; mine[i * kState + 1] = st[i].l; }
            mine[i * kState + 2 + 2 * lane] = st[i].acc0;
            mine[i * kState + 3 + 2 * lane] = st[i].acc1;
        }
    }
    __syncthreads();
    if (split == 0) {
#pragma unroll
        for (int i = 0; i < QT; ++i) {
            if (i >= n) continue;
#pragma unroll
            for (int s = 1; s < QS_ATTN_SPLIT; ++s) {
                const float* other = mine + (s * QT + i) * kState;
                qs::attn_merge(st[i], other[0], other[1], other[2 + 2 * lane], other[3 + 2 * lane]);
            }
            qs::attn_store(st[i], p, t0 + i, head);
        }
    }
}
