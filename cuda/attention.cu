// Attention of query tokens over the paged fp16 KV cache, on tensor cores, for decode steps and
// prompt chunks alike: one arithmetic, so a token's output never depends on whether it came in a
// prefill chunk or a decode step, alone or batched. The query at position pos attends to
// positions [0, pos] of its sequence (its own K/V row was written by rope_kv before this launch,
// or, in decode steps, by this kernel).
//
// A warp holds 16 (token, query head) rows of one GQA group: 16 / group tokens (2 for Qwen2.5's 7
// heads per kv head; rows 14 and 15 unused). A block is (query tile, kv head), or at small decode
// batches (query token, kv head, one of its query heads): `row_groups` such warps times 4 splits,
// all reading the same K/V rows, which the block stages once in shared memory, one round of 4
// tiles (128 positions) at a time with cp.async, the next round in flight while this one is scored. Per row the arithmetic is fixed by its context length alone, whatever
// shares its warp or block:
// - the context is cut into tiles of 32 positions; tile i belongs to split i % 4 (warp split);
// - S = q K^T by mma.sync with q split into fp16 hi + lo parts (q = hi + lo to ~22 bits; the fp16
//   products are exact in the fp32 sums), per 16 dims hi then lo;
// - each split runs an online softmax per row over its tiles in increasing order (max and sum
//   over a tile's 32 positions in lane-quad order); positions past the row's context get weight 0
//   (their staged V rows are real or zero-filled, so 0 * V is 0);
// - acc += P V by mma, P split into hi + lo the same way;
// - the four split states are merged in split order, ((s0 + s1) + s2) + s3, then normalized.
// A tile wholly past a row's context leaves its state bitwise unchanged (correction 1, weights
// 0), so a row's output is the same in a decode step, in a prompt chunk of any length, or beside
// rows of longer contexts (GPU tests). Against the fp32 reference the relative error is ~1e-6.
// Against the fp32-FMA kernels this replaced (H200, synthetic weights, whole forward as a graph):
// 512-token prompt 4.86 -> 4.20 ms, 2048 tokens 22.9 -> 14.1 ms, a decode step of 256 sequences
// 3.73 -> 3.52 ms, of 1 sequence 0.895 -> 0.948 ms with 7 heads per block, 0.933-0.941 with one.
//
// Decode steps (rope_fused): every token is the newest of its sequence, so the only K/V row it
// needs that is not in the cache yet is its own. The kernel then also does rope_kv.cu's work (one
// launch fewer per layer): it reads q, k, v unrotated from the q/k/v launches' rows, applies bias
// + RoPE (qs::rope_pair, rope_kv's arithmetic), puts its own K/V row straight into the staged
// round instead of copying it from the cache, and writes that row to the cache (slot < 0:
// padding, no write). Prompt chunks need each other's rows in the cache first: they run rope_kv,
// then this kernel with rope_fused = 0.
#include "common.cuh"
#include "mma.cuh"
#include "pdl.cuh"

#define QS_ATTN_HEAD_DIM 64
#define QS_ATTN_TILE 32
#define QS_ATTN_SPLIT 4                                   // warps per row group; tile i -> split i % 4
#define QS_ATTN_ROUND (QS_ATTN_SPLIT * QS_ATTN_TILE)      // positions staged together: 128
#define QS_ATTN_ROW 72          // halves per staged row: 64 + 8 of padding, so that the 8 rows one
                                // ldmatrix matrix reads fall on different banks
#define QS_ATTN_MMA_ROWS 16             // (token, head) rows per warp: the mma's M
#define QS_ATTN_MMA_MAX_ROW_GROUPS 2    // attention_mma: up to 8 warps per block
#define QS_ATTN_Q_ROW 72                // halves per staged q row (as QS_ATTN_ROW: conflict-free ldmatrix)
// Dynamic shared memory (mirrored by ops/attention.py): two rounds of K rows, then two of V rows,
// then the q rows of up to QS_ATTN_MMA_MAX_ROW_GROUPS row groups as fp16 hi and lo parts.
#define QS_ATTN_STAGE_BYTES (2 * 2 * QS_ATTN_ROUND * QS_ATTN_ROW * 2)
#define QS_ATTN_SHARED_BYTES \
    (QS_ATTN_STAGE_BYTES + 2 * QS_ATTN_MMA_MAX_ROW_GROUPS * QS_ATTN_MMA_ROWS * QS_ATTN_Q_ROW * 2)

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

// Element offset of kv_head's row at absolute position `pos` of a sequence (block table row
// `table`) in a cache: 32-bit unsigned arithmetic (ops/attention.py checks that a cache holds
// fewer than 2^32 halves), unsigned division by the block size.
__device__ __forceinline__ unsigned paged_row_offset(const int* table, int pos, unsigned block_size,
                                                     unsigned num_kv_heads, int kv_head) {
    const unsigned slot = (unsigned)table[(unsigned)pos / block_size] * block_size + (unsigned)pos % block_size;
    return (slot * num_kv_heads + kv_head) * QS_ATTN_HEAD_DIM;
}

// Pieces half, half + 2, half + 4, half + 6 (16 bytes each) of one K or V row: 4 cp.async with
// immediate offsets from one address pair (the per-copy 64-bit address arithmetic was a large
// share of a small launch's instructions); 16 zero bytes each where `real` is false.
__device__ __forceinline__ void attn_copy_row_pieces(__half* dst_row, const __half* src_row, int half, bool real) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst_row + 8 * half));
    const __half* src = src_row + 8 * half;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 "cp.async.cg.shared.global [%0+32], [%1+32], 16, %2;\n"
                 "cp.async.cg.shared.global [%0+64], [%1+64], 16, %2;\n"
                 "cp.async.cg.shared.global [%0+96], [%1+96], 16, %2;\n"
                 :: "r"(d), "l"(src), "r"(real ? 16 : 0) : "memory");
}

// Decode steps: this token's own K/V row (position own_pos), biased and rotated from k_in / v_in,
// into its staged rows, and (the writer block of the kv head) into the cache as rope_kv.cu would.
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
// kv_head (positions [128 * round, 128 * round + 128) of the context) into one stage; rows of
// positions past the context are zero-filled (they are multiplied by weights 0, and stale bytes
// could hold an fp16 inf or NaN). Threads 2r and 2r + 1 stage row r: each reads the row's cache
// offset through the block table itself (no shared table, no barrier) and copies 4 of its 8
// 16-byte K pieces and 4 of its V pieces, neighbours taking neighbouring pieces so that each copy
// instruction of a warp reads whole 32-byte sectors. A thread's (at most 2) table reads are all
// issued before its first copy: the cp.async asm orders memory for the compiler, so a read placed
// after one would wait for it. (The generic strided loop this replaces spent ~44% of a batch-1
// launch's instructions on index arithmetic; ncu, session 7.)
// Decode steps: the token's own row (the context's last) comes from attn_own_kv_row, not the cache.
__device__ __forceinline__ void attn_stage_round(const AttentionParams& p, const int* table, int kv_head,
                                                 int context_len, int round, AttnRow* k_stage, AttnRow* v_stage,
                                                 int t) {
    constexpr int kPairs = 2 * QS_ATTN_ROUND;   // (row, half) pairs: <= 2 per thread (blockDim >= 128)
    const int start = round * QS_ATTN_ROUND;
    const int own_pos = p.rope_fused ? context_len - 1 : -1;
    long long offsets[2];
#pragma unroll
    for (int it = 0; it < 2; ++it) {
        const int i = threadIdx.x + it * blockDim.x, pos = start + (i >> 1);
        offsets[it] = i >= kPairs || pos == own_pos ? -1                 // no copy
                      : pos >= context_len ? -2                           // zero-filled
                      : (long long)paged_row_offset(table, pos, (unsigned)p.block_size, (unsigned)p.num_kv_heads, kv_head);
    }
#pragma unroll
    for (int it = 0; it < 2; ++it) {
        if (offsets[it] == -1) continue;
        const int i = threadIdx.x + it * blockDim.x, row = i >> 1, half = i & 1;
        const bool real = offsets[it] >= 0;
        const unsigned offset = real ? (unsigned)offsets[it] : 0u;
        attn_copy_row_pieces(k_stage[row], p.k_cache + offset, half, real);
        attn_copy_row_pieces(v_stage[row], p.v_cache + offset, half, real);
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
    if (own_pos >= start && own_pos < start + QS_ATTN_ROUND)
        attn_own_kv_row(p, t, kv_head, own_pos, blockIdx.y % ((int)gridDim.y / (int)p.num_kv_heads) == 0,
                        k_stage[own_pos - start], v_stage[own_pos - start]);
}

// (x0, x1) -> fp16 pairs hi, lo with hi = fp16(x), lo = fp16(x - hi).
__device__ __forceinline__ void split_half2(float x0, float x1, uint32_t& hi, uint32_t& lo) {
    const __half2 h = __floats2half2_rn(x0, x1);
    const float2 hf = __half22float2(h);
    const __half2 l = __floats2half2_rn(__fsub_rn(x0, hf.x), __fsub_rn(x1, hf.y));
    hi = *reinterpret_cast<const uint32_t*>(&h);
    lo = *reinterpret_cast<const uint32_t*>(&l);
}

__device__ __forceinline__ void split_half(float x, __half& hi, __half& lo) {
    hi = __float2half_rn(x);
    lo = __float2half_rn(__fsub_rn(x, __half2float(hi)));
}

// One lane's share of its warp's 16 rows: rows g = lane / 4 (index 0) and g + 8 (index 1);
// acc[d] holds output dims 8d + 2t, 8d + 2t + 1 (t = lane % 4) of row g ([0], [1]) and g + 8.
struct AttnMmaState {
    float m[2];
    float l[2];
    float acc[8][4];
};

// One tile of 32 staged positions (tile_start ..) for the warp's rows; ctx: this lane's two
// rows' context lengths (0: unused row). UPPER = false: rows 8..15 are all unused in this warp
// (decode steps), and their softmax is skipped; rows 0..7 get the same operations either way.
template <bool UPPER>
__device__ __forceinline__ void attn_mma_tile(AttnMmaState& st, const uint32_t (&q_hi)[4][4],
                                              const uint32_t (&q_lo)[4][4], const AttnRow* k_tile,
                                              const AttnRow* v_tile, int tile_start, const int (&ctx)[2],
                                              float scale) {
    constexpr int kRows = UPPER ? 2 : 1;
    const int lane = threadIdx.x & 31, t = lane & 3;
    // S = q K^T. n-block j = positions 8j .. 8j + 7; per block the order is k16 step 0 hi, 0 lo,
    // 1 hi, ... 3 lo. The mma statements issue in program order (asm volatile), so the four
    // blocks' chains are interleaved by hand. K fragments are loaded 32 dims at a time.
    float s[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        uint32_t kf[4][4];   // block j's B fragments of k16 steps 2 half, 2 half + 1
#pragma unroll
        for (int j = 0; j < 4; ++j) ldmatrix_x4(kf[j], k_tile[8 * j + (lane & 7)] + 32 * half + 8 * (lane >> 3));
#pragma unroll
        for (int step = 0; step < 2; ++step) {
            const int kk = 2 * half + step;
#pragma unroll
            for (int part = 0; part < 2; ++part) {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    mma_16x8x16(s[j], part == 0 ? q_hi[kk] : q_lo[kk], kf[j][2 * step], kf[j][2 * step + 1]);
            }
        }
    }
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2 * kRows; ++e) {
            const int r = e >> 1, pos = tile_start + 8 * j + 2 * t + (e & 1);
            s[j][e] = pos < ctx[r] ? __fmul_rn(s[j][e], scale) : -INFINITY;
            tile_max[r] = fmaxf(tile_max[r], s[j][e]);
        }
    }
    float correction[2] = {1.0f, 1.0f};
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
        tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
        const float m_new = fmaxf(st.m[r], tile_max[r]);
        correction[r] = m_new == -INFINITY ? 1.0f : expf(st.m[r] - m_new);   // 0 on the row's first tile
        st.m[r] = m_new;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = e >> 1;
            if (r >= kRows) { s[j][e] = 0.0f; continue; }
            s[j][e] = s[j][e] == -INFINITY ? 0.0f : expf(__fsub_rn(s[j][e], st.m[r]));
            sum[r] = __fadd_rn(sum[r], s[j][e]);
        }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
        sum[r] = __fadd_rn(sum[r], __shfl_xor_sync(0xffffffffu, sum[r], 1));   // a + b == b + a: every
        sum[r] = __fadd_rn(sum[r], __shfl_xor_sync(0xffffffffu, sum[r], 2));   // lane of the quad agrees
        st.l[r] = __fmaf_rn(st.l[r], correction[r], sum[r]);
    }
#pragma unroll
    for (int d = 0; d < 8; ++d) {
#pragma unroll
        for (int e = 0; e < 2 * kRows; ++e) st.acc[d][e] = __fmul_rn(st.acc[d][e], correction[e >> 1]);
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {   // positions 16kk .. 16kk + 15: the weights of blocks 2kk, 2kk + 1
        uint32_t p_hi[4], p_lo[4];
        split_half2(s[2 * kk][0], s[2 * kk][1], p_hi[0], p_lo[0]);
        split_half2(s[2 * kk][2], s[2 * kk][3], p_hi[1], p_lo[1]);
        split_half2(s[2 * kk + 1][0], s[2 * kk + 1][1], p_hi[2], p_lo[2]);
        split_half2(s[2 * kk + 1][2], s[2 * kk + 1][3], p_hi[3], p_lo[3]);
        uint32_t vf[4][4];   // dims 16dp .. 16dp + 15: B fragments of n-blocks 2dp, 2dp + 1
        const int matrix = lane >> 3;
#pragma unroll
        for (int dp = 0; dp < 4; ++dp)
            ldmatrix_x4_trans(vf[dp], v_tile[16 * kk + 8 * (matrix & 1) + (lane & 7)] + 16 * dp + 8 * (matrix >> 1));
#pragma unroll
        for (int part = 0; part < 2; ++part) {   // per output block: hi, then lo (8 chains side by side)
#pragma unroll
            for (int dp = 0; dp < 4; ++dp) {
                mma_16x8x16(st.acc[2 * dp], part == 0 ? p_hi : p_lo, vf[dp][0], vf[dp][1]);
                mma_16x8x16(st.acc[2 * dp + 1], part == 0 ? p_hi : p_lo, vf[dp][2], vf[dp][3]);
            }
        }
    }
}

// The body of both entries below; blockDim.x = 128 * row_groups.
__device__ __forceinline__ void attention_mma_block(const AttentionParams& p) {
    extern __shared__ __align__(16) uint8_t attn_smem[];
    pdl_wait_for_previous_kernel();   // everything below reads what earlier kernels (or the host) wrote
    AttnRow* k_stages = reinterpret_cast<AttnRow*>(attn_smem);           // [2][128]
    AttnRow* v_stages = k_stages + 2 * QS_ATTN_ROUND;                    // [2][128]
    const int group = (int)p.num_heads / (int)p.num_kv_heads;
    const int tokens_per_warp = QS_ATTN_MMA_ROWS / group, rows_used = tokens_per_warp * group;
    const int row_groups = blockDim.x / (32 * QS_ATTN_SPLIT);
    const int qt = p.rope_fused ? 1 : row_groups * tokens_per_warp;   // decode: every token its own tile
    const int num_tokens = gridDim.x;
    const int t0 = num_tokens - 1 - blockIdx.x;
    const int seq = p.token_seq[t0], pos0 = p.positions[t0];
    const bool run_start = t0 == 0 || p.token_seq[t0 - 1] != seq || p.positions[t0 - 1] != pos0 - 1;
    if (t0 % qt != 0 && !run_start) return;   // inside another block's tile
    int n = 1;
    while (n < qt && t0 + n < num_tokens && (t0 + n) % qt != 0 && p.token_seq[t0 + n] == seq
           && p.positions[t0 + n] == pos0 + n)
        ++n;
    // blockIdx.y = (kv head, part): the group's heads may be spread over `parts` blocks (decode steps
    // at small batches: more multiprocessors busy). A block's rows keep their places; the rows of
    // other parts' heads are unused (rows are independent in the mma: the same bits either way).
    const int parts = gridDim.y / (int)p.num_kv_heads, heads_per_part = group / parts;
    const int kv_head = blockIdx.y / parts, first_h = (blockIdx.y % parts) * heads_per_part;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row_group = warp / QS_ATTN_SPLIT, split = warp % QS_ATTN_SPLIT;
    const int first_context = pos0 + 1, last_context = first_context + n - 1;
    const int num_rounds = (last_context + QS_ATTN_ROUND - 1) / QS_ATTN_ROUND;
    const int* table = p.block_tables + (size_t)seq * p.max_blocks_per_seq;
    // Rounds 0 and 1 go out first: at small batches the copies' latency, not the scoring, sets the time.
    attn_stage_round(p, table, kv_head, last_context, 0, k_stages, v_stages, t0);
    if (num_rounds > 1)
        attn_stage_round(p, table, kv_head, last_context, 1, k_stages + QS_ATTN_ROUND, v_stages + QS_ATTN_ROUND, t0);

    // q rows of the block's tokens, split into fp16 hi and lo rows ([row_group][16][72] each, after
    // the stages): one pass by the whole block, then each warp ldmatrix-loads its fragments. Rows
    // of no token stay unwritten: their scores are masked before use. Decode steps rotate q here
    // (rope_pair: rope_kv's arithmetic).
    __half* q_hi_rows = reinterpret_cast<__half*>(attn_smem + QS_ATTN_STAGE_BYTES);
    __half* q_lo_rows = q_hi_rows + row_groups * QS_ATTN_MMA_ROWS * QS_ATTN_Q_ROW;
    {
        constexpr int kHalf = QS_ATTN_HEAD_DIM / 2;
        for (int i = threadIdx.x; i < n * heads_per_part * kHalf; i += blockDim.x) {   // (token, head, dims c / c + 32)
            const int token_head = i / kHalf, c = i % kHalf;
            const int local = token_head / heads_per_part, h = first_h + token_head - local * heads_per_part;
            const int head = kv_head * group + h;
            float x0, x1;
            if (p.rope_fused) {
                const size_t angle = (size_t)(first_context - 1) * kHalf + c;
                rope_pair(p.q_in + (size_t)t0 * p.q_in_stride, p.bias_q, head * QS_ATTN_HEAD_DIM, c, kHalf,
                          p.cos_table[angle], p.sin_table[angle], &x0, &x1);
            } else {
                const float* q_row = p.q + ((size_t)(t0 + local) * p.num_heads + head) * QS_ATTN_HEAD_DIM;
                x0 = q_row[c];
                x1 = q_row[c + kHalf];
            }
            const int row = (local / tokens_per_warp) * QS_ATTN_MMA_ROWS + (local % tokens_per_warp) * group + h;
            __half* hi = q_hi_rows + row * QS_ATTN_Q_ROW;
            __half* lo = q_lo_rows + row * QS_ATTN_Q_ROW;
            split_half(x0, hi[c], lo[c]);
            split_half(x1, hi[c + kHalf], lo[c + kHalf]);
        }
    }
    __syncthreads();
    uint32_t q_hi[4][4], q_lo[4][4];
    {
        const int row = row_group * QS_ATTN_MMA_ROWS + (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
            const int col = 16 * kk + 8 * (lane >> 4);
            ldmatrix_x4(q_hi[kk], q_hi_rows + row * QS_ATTN_Q_ROW + col);
            ldmatrix_x4(q_lo[kk], q_lo_rows + row * QS_ATTN_Q_ROW + col);
        }
    }
    int ctx[2];   // this lane's rows g, g + 8: context length, 0 for a row of no token
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = g + 8 * r, local = row_group * tokens_per_warp + row / group, h = row % group;
        ctx[r] = row < rows_used && local < n && h >= first_h && h < first_h + heads_per_part ? first_context + local : 0;
    }
    const int first_local = row_group * tokens_per_warp;
    const int warp_context = first_local < n ? first_context + min(n - 1, first_local + tokens_per_warp - 1) : 0;
    const bool upper = rows_used > 8 && first_local + 8 / group < n;   // some row 8..15 is used

    AttnMmaState st;
#pragma unroll
    for (int r = 0; r < 2; ++r) { st.m[r] = -INFINITY; st.l[r] = 0.0f; }
#pragma unroll
    for (int d = 0; d < 8; ++d) st.acc[d][0] = st.acc[d][1] = st.acc[d][2] = st.acc[d][3] = 0.0f;
    for (int round = 0; round < num_rounds; ++round) {
        // Pending: rounds `round` and, if there is one, round + 1.
        if (round + 1 < num_rounds) asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        else asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();
        const int tile_start = (round * QS_ATTN_SPLIT + split) * QS_ATTN_TILE;
        if (tile_start < warp_context) {
            const int stage_row = (round & 1) * QS_ATTN_ROUND + split * QS_ATTN_TILE;
            if (upper)
                attn_mma_tile<true>(st, q_hi, q_lo, k_stages + stage_row, v_stages + stage_row, tile_start, ctx, p.scale);
            else
                attn_mma_tile<false>(st, q_hi, q_lo, k_stages + stage_row, v_stages + stage_row, tile_start, ctx, p.scale);
        }
        __syncthreads();   // this round's stage is free: round + 2 takes it
        if (round + 2 < num_rounds) {
            const int stage = (round & 1) * QS_ATTN_ROUND;
            attn_stage_round(p, table, kv_head, last_context, round + 2, k_stages + stage, v_stages + stage, t0);
        }
    }
    pdl_allow_next_kernel();   // the scoring is done: the next kernel may start its CTAs
    // Every split's state goes to the (now free) stage memory, [row_group][split][m[16], l[16],
    // acc[16][kAccStride]]; then warp (row_group, s) merges and stores output dims 16s .. 16s + 15
    // of the row group (d-blocks 2s, 2s + 1), so the four warps share the merge.
    constexpr int kAccStride = QS_ATTN_HEAD_DIM + 4;
    constexpr int kStateFloats = 2 * QS_ATTN_MMA_ROWS + QS_ATTN_MMA_ROWS * kAccStride;
    float* states = reinterpret_cast<float*>(attn_smem) + row_group * QS_ATTN_SPLIT * kStateFloats;
    {
        float* mine = states + split * kStateFloats;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (ctx[r] == 0) continue;
            if (t == 0) { mine[g + 8 * r] = st.m[r]; mine[QS_ATTN_MMA_ROWS + g + 8 * r] = st.l[r]; }
            float* acc_row = mine + 2 * QS_ATTN_MMA_ROWS + (g + 8 * r) * kAccStride;
#pragma unroll
            for (int d = 0; d < 8; ++d)
                *reinterpret_cast<float2*>(acc_row + 8 * d + 2 * t) = make_float2(st.acc[d][2 * r], st.acc[d][2 * r + 1]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (ctx[r] == 0) continue;
        const int row = g + 8 * r;
        float m = states[row], l = states[QS_ATTN_MMA_ROWS + row];
        float2 acc[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            acc[i] = *reinterpret_cast<const float2*>(states + 2 * QS_ATTN_MMA_ROWS + row * kAccStride
                                                      + 8 * (2 * split + i) + 2 * t);
#pragma unroll
        // a <- a merged with split s: m = max(m_a, m_b), a's terms scaled by exp(m_a - m), b's by
        // exp(m_b - m) (0 where split s saw no tile: a unchanged). Split 0 always holds tile 0, so m_a
        // is finite. The roundings are spelled out: left to contraction, x * ca + y * cb may fuse
        // either product.
        for (int s = 1; s < QS_ATTN_SPLIT; ++s) {
            const float* other = states + s * kStateFloats;
            const float m_b = other[row], l_b = other[QS_ATTN_MMA_ROWS + row];
            const float m_new = fmaxf(m, m_b);
            const float ca = expf(m - m_new), cb = expf(m_b - m_new);
            l = fmaf(l, ca, __fmul_rn(l_b, cb));
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const float2 acc_b = *reinterpret_cast<const float2*>(other + 2 * QS_ATTN_MMA_ROWS + row * kAccStride
                                                                      + 8 * (2 * split + i) + 2 * t);
                acc[i].x = fmaf(acc[i].x, ca, __fmul_rn(acc_b.x, cb));
                acc[i].y = fmaf(acc[i].y, ca, __fmul_rn(acc_b.y, cb));
            }
            m = m_new;
        }
        const float inv_l = 1.0f / l;
        const int token = t0 + ctx[r] - first_context, head = kv_head * group + row % group;
        const size_t out_row = (size_t)token * p.num_heads * QS_ATTN_HEAD_DIM;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const float lo = acc[i].x * inv_l, hi = acc[i].y * inv_l;
            const int col = head * QS_ATTN_HEAD_DIM + 8 * (2 * split + i) + 2 * t;
            *reinterpret_cast<float2*>(p.out + out_row + col) = make_float2(lo, hi);
            if (p.out16) *reinterpret_cast<__half2*>(p.out16 + out_row + slot_position(col)) = __floats2half2_rn(lo, hi);
        }
    }
}

}  // namespace qs

// Prompt chunks (and mixed steps): grid = (num_tokens, num_kv_heads): block x serves the query
// tile starting at token num_tokens - 1 - x, if one does, the others return at once (so the
// longest contexts start first). A query tile is up to row_groups * 16 / group consecutive tokens
// of one sequence at consecutive positions: from an aligned token index (a multiple of the tile
// size) or from the start of such a run, up to the next aligned index or the run's end.
// block = 128 * row_groups threads (row_groups 1..2); dynamic shared memory QS_ATTN_SHARED_BYTES.
extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_SPLIT * QS_ATTN_MMA_MAX_ROW_GROUPS, 2)
attention_mma(const AttentionParams p) {
    qs::attention_mma_block(p);
}

// Decode steps (rope_fused; also any launch of one-row-group blocks): the same body built for 128
// threads, so the compiler is not held to attention_mma's register budget. Same arithmetic (GPU
// test: rope_kv + attention_mma against this, bitwise). grid = (num_tokens, num_kv_heads * parts):
// parts (1, or the group size) spreads a kv head's query heads over that many blocks.
extern "C" __global__ void __launch_bounds__(32 * QS_ATTN_SPLIT) attention_mma_decode(const AttentionParams p) {
    qs::attention_mma_block(p);
}
