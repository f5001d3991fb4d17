// Tensor-core linear layer for any number of tokens: y[m, n] = sum_k x[m, k] * W[n, k].
//
// W: [N, K] in any GGUF format (quant_formats.cuh), x: [M, K] fp32, y: [M, N] fp32, K % 32 == 0.
// Operands are rounded to fp16 (x as read, W after dequantization), products are summed in fp32 by
// mma.sync m16n8k16: W rows are the mma's M (16 rows), tokens its N (8 tokens), so one arithmetic
// is bandwidth-bound at a single token and compute-bound at thousands.
//
// The arithmetic (what makes a result bitwise reproducible): K is cut into 32-column sub-chunks
// c = 0, 1, ...; the sub-chunks with c % 4 == v feed accumulator v, in increasing c, each as two
// mmas (lane t of a quad feeds its 8 columns to k slots {2t, 2t+1, 2t+8, 2t+9} of the two mmas:
// a fixed permutation, the same for A and B, so the products are those of column order); then
// y = ((acc0 + acc1) + acc2) + acc3. That depends on (K, type) only, never on M, the token's place
// in a tile, the tile sizes, the K chunk width or the grid, so a token gets bitwise the same output
// alone, batched or in a prefill chunk. (It is not bitwise equal to matvec.cu's fp32 result.)
// Values of x beyond fp16's range (|x| > 65504) become inf, as in any fp16 GEMM.
//
// Three CTA layouts run that arithmetic (4 warps, 8 * NG tokens per CTA):
// - linear_mma_*  (16 rows per CTA): warp w owns accumulator w of the CTA's 16 rows; the partial
//   sums meet in shared memory. Many CTAs for few rows.
// - linear_mma_narrow_* (8 rows x 16 tokens per CTA): the same split with the mma's operands
//   swapped (W as B, tokens as A), so each lane dequantizes half as much: decode steps.
// - linear_mma_rows_* (64 rows per CTA): warp w owns rows 16w..16w+15 and all four accumulators.
//   Each staged x value serves 4x the rows: large matrices and prefill.
// Per K chunk a CTA stages its rows' bytes and its tokens' x values global -> shared with 16-byte
// cp.async, double-buffered (the next chunk is in flight while this one is multiplied), so the
// inner loop reads shared memory only.
#include <type_traits>

#include "common.cuh"
#include "linear_mma_common.cuh"
#include "pdl.cuh"

namespace linear_mma_detail {

// Bytes of one token's x chunk in shared memory: 16 of padding keep the 8 tokens a warp reads
// at once on different banks.
__device__ __forceinline__ int x_stride(const LinearArgs& a) { return 4 * a.chunk_cols + 16; }

// Whole rows in one stage (chunk_cols == K): the CTA's rows are one contiguous byte range, copied
// flat (row r at (start % 16) + r * row_bytes, chunk_stride == row_bytes). Otherwise each row chunk
// is copied on its own (row r at r * chunk_stride, from its 16-byte boundary below).
__device__ __forceinline__ bool whole_rows(const LinearArgs& a) { return a.chunk_cols >= a.num_cols; }

// Shared layout of one staging buffer: the weight bytes of ROWS rows, then x_rows token chunks.
template <int ROWS>
__device__ __forceinline__ int weight_bytes(const LinearArgs& a) {
    return whole_rows(a) ? (ROWS * a.row_bytes + 31) / 16 * 16 : ROWS * a.chunk_stride;
}
template <int ROWS>
__device__ __forceinline__ int buffer_bytes(const LinearArgs& a) {
    return weight_bytes<ROWS>(a) + a.x_rows * x_stride(a);
}

// Issues the cp.async copies of chunk k0's W bytes (columns [k0, k0 + chunk_cols) clipped to K) of
// rows [n0, n0 + ROWS). Loops are warp x lane strided: no index division on the issue path.
template <int T, int ROWS>
__device__ __forceinline__ void stage_weights(const LinearArgs& a, int n0, int k0, uint8_t* buf) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int num_cols = min(a.chunk_cols, a.num_cols - k0);
    if (whole_rows(a)) {
        const long long begin = static_cast<long long>(n0) * a.row_bytes;
        const long long end = static_cast<long long>(min(n0 + ROWS, a.num_rows)) * a.row_bytes;
        const long long first = begin & ~15LL;
        for (long long src = first + 16LL * threadIdx.x; src < end; src += 16LL * kThreads)
            copy16(buf + (src - first), a.weight + src, end - src >= 16 ? 16 : int(end - src));
    } else {
        const long long chunk_offset = static_cast<long long>(k0 / kValues) * kBytes;
        const long long chunk_bytes = static_cast<long long>(num_cols / kValues) * kBytes;
        for (int r = warp; r < ROWS && n0 + r < a.num_rows; r += kWarps) {
            const long long begin = static_cast<long long>(n0 + r) * a.row_bytes + chunk_offset;
            copy_bytes_warp(buf + r * a.chunk_stride, a.weight, begin, begin + chunk_bytes, lane);
        }
    }
}

// Issues the cp.async copies of chunk k0's x values of tokens [m0, m0 + num_tokens) to xs (token t
// at t * x_stride).
__device__ __forceinline__ void stage_x(const LinearArgs& a, int m0, int num_tokens, int k0, uint8_t* xs) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int num_cols = min(a.chunk_cols, a.num_cols - k0);
    for (int t = warp; t < num_tokens; t += kWarps) {
        const float* x_row = a.x + static_cast<long long>(m0 + t) * a.num_cols + k0;
        for (int v = lane; v < num_cols / 4; v += 32) copy16(xs + t * x_stride(a) + 16 * v, x_row + 4 * v, 16);
    }
}

__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Chunk k0 (W bytes, then x values) into one staging buffer, as one cp.async group.
template <int T, int ROWS>
__device__ __forceinline__ void stage_chunk(const LinearArgs& a, int n0, int m0, int num_tokens, int k0,
                                            uint8_t* buf) {
    stage_weights<T, ROWS>(a, n0, k0, buf);
    stage_x(a, m0, num_tokens, k0, buf + weight_bytes<ROWS>(a));
    commit_copies();
}

// What one warp needs to multiply 16 staged rows (tile rows row0..row0+15) by the staged tokens.
struct WarpTile {
    const uint8_t* rows[2];   // this lane's rows: row0 + group and row0 + group + 8
    const uint8_t* xs;        // the x buffer
};

// Where tile row r's bytes of chunk k0 start in the staging buffer.
template <int T>
__device__ __forceinline__ const uint8_t* staged_row(const LinearArgs& a, const uint8_t* buf, int n0, int r, int k0) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    if (whole_rows(a)) return buf + ((static_cast<long long>(n0) * a.row_bytes) & 15) + r * a.row_bytes;
    const long long begin = static_cast<long long>(n0 + r) * a.row_bytes + static_cast<long long>(k0 / kValues) * kBytes;
    return buf + r * a.chunk_stride + (begin & 15);
}

template <int T, int ROWS>
__device__ __forceinline__ WarpTile warp_tile(const LinearArgs& a, const uint8_t* buf, int n0, int row0, int k0) {
    const int group = (threadIdx.x & 31) >> 2;
    WarpTile tile;
    // Rows past N read stale shared bytes (likewise tokens past M): their products land only in
    // outputs that are never stored.
#pragma unroll
    for (int h = 0; h < 2; ++h) tile.rows[h] = staged_row<T>(a, buf, n0, row0 + group + 8 * h, k0);
    tile.xs = buf + weight_bytes<ROWS>(a);
    return tile;
}

// A lane's 8 columns of its j-th step (0, 1, ...) over a staged row chunk: columns col0 + 128 j,
// col0 = 32 v + 8 t < 128 for accumulator v and quad lane t (sub-chunk v + 4 j; chunks start at
// multiples of 128 and of the block). Returns the block holding them and sets i, their index in
// it. For every type that index is the same on every step of one parity (ODD: j odd), so the
// compiler keeps the in-block arithmetic out of the loop and a step costs one pointer add (in the
// Q6_K narrow kernel's SASS, 94 -> 85.5 instructions per step against block_of's division and modulo).
template <int T, bool ODD>
__device__ __forceinline__ const uint8_t* lane_block(const uint8_t* row, int col0, int j, int& i) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    static_assert(kValues == 1 || kValues == 32 || kValues == 256, "a block of 1, 32 or 256 values");
    if constexpr (kValues == 256) {         // two steps per block
        i = col0 + (ODD ? 128 : 0);
        return row + (j >> 1) * kBytes;
    } else if constexpr (kValues == 32) {   // four blocks per step
        i = col0 & 31;
        return row + ((col0 >> 5) + 4 * j) * kBytes;
    } else {                                // float types: one value per "block"
        i = 0;
        return row + (col0 + 128 * j) * kBytes;
    }
}

// Runs step(j, odd) for j = 0, 1, ... while first_sub + 4 j < num_sub (accumulator first_sub's
// sub-chunks, in order), odd a std::bool_constant of j's parity (for lane_block).
template <typename Step>
__device__ __forceinline__ void for_each_step(int first_sub, int num_sub, Step step) {
    for (int j = 0; first_sub + 4 * j < num_sub; j += 2) {
        step(j, std::false_type{});
        if (first_sub + 4 * (j + 1) < num_sub) step(j + 1, std::true_type{});
    }
}

// acc[g] += the lane's rows (their 8 columns at index i of blocks lo and hi) x tokens 8g..8g+7,
// the columns at col of the staged x chunk.
template <int T, int NG>
__device__ __forceinline__ void multiply_blocks(const LinearArgs& a, const uint8_t* xs, const uint8_t* lo_block,
                                                const uint8_t* hi_block, int i, int col, int num_groups,
                                                float acc[NG][4]) {
    const int group = (threadIdx.x & 31) >> 2;
    uint32_t frag[2][4];
    if constexpr (T == qformats::kF16) {
        // fp16 weights (e.g. an F16 conversion): the fragments are the stored halves, 16
        // bytes per row (rows are 16-byte aligned: row_bytes = 2K, K % 32 == 0), no conversion.
        const uint4 lo = *reinterpret_cast<const uint4*>(lo_block);
        const uint4 hi = *reinterpret_cast<const uint4*>(hi_block);
        frag[0][0] = lo.x; frag[0][1] = hi.x; frag[0][2] = lo.y; frag[0][3] = hi.y;
        frag[1][0] = lo.z; frag[1][1] = hi.z; frag[1][2] = lo.w; frag[1][3] = hi.w;
    } else {
        uint32_t lo[4], hi[4];
        qformats::dequant8_half2_block<T>(lo_block, i, lo);
        qformats::dequant8_half2_block<T>(hi_block, i, hi);
        pack_a_fragments(lo, hi, frag);
    }
#pragma unroll
    for (int j = 0; j < NG; ++j) {
        if (j >= num_groups) break;
        // Token 8j + group; a lane past the staged tokens reads the last one (never stored).
        const int token = min(8 * j + group, a.x_rows - 1);
        const float4* xp = reinterpret_cast<const float4*>(xs + token * x_stride(a) + 4 * col);
        const float4 x0 = xp[0], x1 = xp[1];
        mma_16x8x16(acc[j], frag[0], pack_half2(x0.x, x0.y), pack_half2(x0.z, x0.w));
        mma_16x8x16(acc[j], frag[1], pack_half2(x1.x, x1.y), pack_half2(x1.z, x1.w));
    }
}

// acc[g] += rows x tokens 8g..8g+7 over sub-chunk `sub` (columns relative to the chunk start).
template <int T, int NG>
__device__ __forceinline__ void multiply_sub_chunk(const LinearArgs& a, const WarpTile& tile, int sub,
                                                   int num_groups, float acc[NG][4]) {
    const int col = sub * kSubK + 8 * (threadIdx.x & 3);   // this lane's 8 columns
    int i;
    const uint8_t* lo = qformats::block_of<T>(tile.rows[0], col, i);
    const uint8_t* hi = qformats::block_of<T>(tile.rows[1], col, i);
    multiply_blocks<T, NG>(a, tile.xs, lo, hi, i, col, num_groups, acc);
}

// The same for step j of accumulator `warp` (for_each_step).
template <int T, int NG, bool ODD>
__device__ __forceinline__ void multiply_step(const LinearArgs& a, const WarpTile& tile, int warp, int j,
                                              int num_groups, float acc[NG][4]) {
    const int col0 = warp * kSubK + 8 * (threadIdx.x & 3);
    int i;
    const uint8_t* lo = lane_block<T, ODD>(tile.rows[0], col0, j, i);
    const uint8_t* hi = lane_block<T, ODD>(tile.rows[1], col0, j, i);
    multiply_blocks<T, NG>(a, tile.xs, lo, hi, i, col0 + 4 * kSubK * j, num_groups, acc);
}

// Decode steps (*_norm_* kernels of the decode tiles): the staged x rows (whole K, at most 16 of
// them) replaced by RMSNorm(x) * norm_weight, so the norm needs no launch of its own. The arithmetic is
// rms_norm.cu's with 128 threads: thread i sums squares of elements i, i + 128, ... in one fma
// chain, then qs::warp_sum per warp and the 4 warp sums summed as block_sum does; then
// v * inv_rms * weight. So the values are bitwise those rms_norm_f32 writes (GPU test).
// `gain` is norm_weight staged in shared memory (for_each_chunk).
__device__ __forceinline__ void normalize_staged_x(const LinearArgs& a, uint8_t* xs, const float* gain, int num_tokens) {
    constexpr int kMaxTokens = 16;
    __shared__ float warp_sums[kWarps][kMaxTokens];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int t = 0; t < num_tokens; ++t) {
        const float* x = reinterpret_cast<const float*>(xs + t * x_stride(a));
        float sum_sq = 0.0f;
        for (int i = threadIdx.x; i < a.num_cols; i += kThreads) sum_sq = fmaf(x[i], x[i], sum_sq);
        sum_sq = qs::warp_sum(sum_sq);
        if (lane == 0) warp_sums[warp][t] = sum_sq;
    }
    __syncthreads();
    for (int t = 0; t < num_tokens; ++t) {
        float* x = reinterpret_cast<float*>(xs + t * x_stride(a));
        const float total = qs::warp_sum(lane < kWarps ? warp_sums[lane][t] : 0.0f);
        const float inv_rms = 1.0f / sqrtf(total / (float)a.num_cols + a.norm_eps);
        for (int i = threadIdx.x; i < a.num_cols; i += kThreads) x[i] = x[i] * inv_rms * gain[i];
    }
    __syncthreads();
}

// The K loop both layouts share: stage chunk c + 1 while chunk c is multiplied by `multiply`.
// NORM (decode tiles, whole K in one chunk): x and the norm gain (after the x rows) are copied as a
// cp.async group of their own, ahead of the W bytes, and x is normalized while W is still in flight.
// Launched with PDL (pdl.cuh), a CTA waits here for the previous kernel before it reads x or the
// norm gain (or anything else). Fetching the weights before the wait was slower: H200, synthetic
// weights, decode graph at 1 / 2 / 8 tokens, 860 / 952 / 1,191 us with nothing early, 878 / 967 / 1,202
// with chunk 0's W copied to shared memory first, 880 / 976 / 1,203 with a bulk L2 prefetch of the
// CTA's rows (881 / 970 / 1,222 without PDL).
template <int T, int ROWS, bool NORM, typename Multiply>
__device__ __forceinline__ void for_each_chunk(const LinearArgs& a, int n0, int m0, int num_tokens, Multiply multiply) {
    extern __shared__ __align__(16) uint8_t smem[];
    // Staging buffer c & 1, computed from smem each time: a dynamically indexed array of the two
    // pointers lives in local memory, and the loads through it lose their address space (generic
    // LD instead of LDS, 64-bit address arithmetic in the inner loop).
    const auto buffer = [&](int c) { return smem + (c & 1) * buffer_bytes<ROWS>(a); };
    qs::pdl_wait_for_previous_kernel();
    if constexpr (NORM) {
        uint8_t* xs = smem + weight_bytes<ROWS>(a);
        uint8_t* gain = xs + a.x_rows * x_stride(a);
        stage_x(a, m0, num_tokens, 0, xs);
        for (int v = threadIdx.x; v < a.num_cols / 4; v += kThreads) copy16(gain + 16 * v, a.norm_weight + 4 * v, 16);
        commit_copies();
        stage_weights<T, ROWS>(a, n0, 0, smem);
        commit_copies();
        asm volatile("cp.async.wait_group 1;\n" ::: "memory");   // x is in; W may not be
        __syncthreads();
        normalize_staged_x(a, xs, reinterpret_cast<const float*>(gain), num_tokens);
        asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        __syncthreads();
        multiply(smem, 0, a.num_cols / kSubK);
        __syncthreads();
        return;
    }
    const int num_chunks = (a.num_cols + a.chunk_cols - 1) / a.chunk_cols;
    stage_chunk<T, ROWS>(a, n0, m0, num_tokens, 0, buffer(0));
    for (int c = 0; c < num_chunks; ++c) {
        if (c + 1 < num_chunks) {   // buffer(c + 1) was released by the barrier ending chunk c - 1
            stage_chunk<T, ROWS>(a, n0, m0, num_tokens, (c + 1) * a.chunk_cols, buffer(c + 1));
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        // k0 / 32 is a multiple of 4 (chunk_cols is K or a multiple of 128): a sub-chunk's index
        // in the chunk and in K agree mod 4.
        multiply(buffer(c), c * a.chunk_cols, min(a.chunk_cols, a.num_cols - c * a.chunk_cols) / kSubK);
        __syncthreads();
    }
}

// The 4 accumulators' partial sums of a [ROWS, TOKENS] tile, in shared memory [v][row][token], to
// the outputs in accumulator order ((p0 + p1) + p2) + p3.
template <int EPI, int ROWS, int TOKENS>
__device__ __forceinline__ void write_partials(const LinearArgs& a, const float* partial, int n0, int m0, int num_tokens) {
    write_tile<EPI, ROWS>(a, n0, m0, num_tokens, [&](int row, int token) {
        float sum = partial[row * TOKENS + token];
#pragma unroll
        for (int v = 1; v < kAccumulators; ++v) sum = __fadd_rn(sum, partial[(v * ROWS + row) * TOKENS + token]);
        return sum;
    });
}

// 16 rows per CTA; warp w runs accumulator w (sub-chunks w, w + 4, ...).
template <int T, int NG, int EPI, bool NORM = false>
__device__ void linear_mma_split_k(const LinearArgs& a) {
    extern __shared__ __align__(16) uint8_t smem[];
    constexpr int kRows = 16, kTokens = 8 * NG;
    const int n0 = blockIdx.x * kRows, m0 = blockIdx.y * kTokens;
    const int num_tokens = min(kTokens, a.num_tokens - m0), num_groups = (num_tokens + 7) / 8;
    const int warp = threadIdx.x >> 5;
    float acc[NG][4] = {};
    for_each_chunk<T, kRows, NORM>(a, n0, m0, num_tokens, [&](uint8_t* buf, int k0, int num_sub) {
        const WarpTile tile = warp_tile<T, kRows>(a, buf, n0, 0, k0);
        for_each_step(warp, num_sub, [&](int j, auto odd) {
            multiply_step<T, NG, decltype(odd)::value>(a, tile, warp, j, num_groups, acc);
        });
    });
    qs::pdl_allow_next_kernel();   // the main work is done: the next kernel may start its CTAs
    // Accumulators -> shared [warp][row][token], then summed in accumulator order.
    float* partial = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
#pragma unroll
    for (int j = 0; j < NG; ++j) {
        if (j >= num_groups) break;
#pragma unroll
        for (int e = 0; e < 4; ++e)
            partial[(warp * kRows + group + 8 * (e >> 1)) * kTokens + 8 * j + 2 * quad + (e & 1)] = acc[j][e];
    }
    __syncthreads();
    write_partials<EPI, kRows, kTokens>(a, partial, n0, m0, num_tokens);
}

// 64 rows per CTA; warp w owns rows 16w..16w+15 and runs all four accumulators itself.
template <int T, int NG, int EPI>
__device__ void linear_mma_rows(const LinearArgs& a) {
    extern __shared__ __align__(16) uint8_t smem[];
    constexpr int kRows = 16 * kWarps, kTokens = 8 * NG;
    const int n0 = blockIdx.x * kRows, m0 = blockIdx.y * kTokens;
    const int num_tokens = min(kTokens, a.num_tokens - m0), num_groups = (num_tokens + 7) / 8;
    const int warp = threadIdx.x >> 5;
    float acc[kAccumulators][NG][4] = {};
    for_each_chunk<T, kRows, false>(a, n0, m0, num_tokens, [&](const uint8_t* buf, int k0, int num_sub) {
        const WarpTile tile = warp_tile<T, kRows>(a, buf, n0, 16 * warp, k0);
        for (int sub0 = 0; sub0 < num_sub; sub0 += kAccumulators) {
#pragma unroll
            for (int v = 0; v < kAccumulators; ++v)
                if (sub0 + v < num_sub) multiply_sub_chunk<T, NG>(a, tile, sub0 + v, num_groups, acc[v]);
        }
    });
    qs::pdl_allow_next_kernel();   // the main work is done: the next kernel may start its CTAs
    // Totals -> shared [row][token] (the staging buffers are free after the last barrier).
    float* totals = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
#pragma unroll
    for (int j = 0; j < NG; ++j) {
        if (j >= num_groups) break;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sum = acc[0][j][e];
#pragma unroll
            for (int v = 1; v < kAccumulators; ++v) sum = __fadd_rn(sum, acc[v][j][e]);
            totals[(16 * warp + group + 8 * (e >> 1)) * kTokens + 8 * j + 2 * quad + (e & 1)] = sum;
        }
    }
    __syncthreads();
    write_tile<EPI, kRows>(a, n0, m0, num_tokens, [&](int row, int token) { return totals[row * kTokens + token]; });
}

// 8 rows x 16 tokens per CTA for decode steps, the roles in the mma swapped: W's rows are its N
// (8) and the tokens its M (16), so a lane dequantizes 8 values of one row per sub-chunk where the
// 16-row tile's lanes dequantize two rows'. The per-warp chain (what sets the time at a few
// tokens) halves and twice the CTAs run. The products and their k slots are the other layouts'
// (A's row i and B's column j carry the same 8 columns of lane t), so the sums are too: the GPU
// tests check every layout bitwise against each other. warp w runs accumulator w, as in split_k.
template <int T, int NG, int EPI, bool NORM = false>
__device__ void linear_mma_narrow(const LinearArgs& a) {
    static_assert(NG == 2, "the narrow tile holds 16 tokens (the mma's M)");
    extern __shared__ __align__(16) uint8_t smem[];
    constexpr int kRows = 8, kTokens = 16;
    const int n0 = blockIdx.x * kRows, m0 = blockIdx.y * kTokens;
    const int num_tokens = min(kTokens, a.num_tokens - m0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    // Tokens past M (and rows past N) read stale staged values, as in the other layouts: their
    // sums land only in outputs that are never stored.
    const int token_lo = min(group, a.x_rows - 1), token_hi = min(group + 8, a.x_rows - 1);
    float acc[4] = {};
    for_each_chunk<T, kRows, NORM>(a, n0, m0, num_tokens, [&](uint8_t* buf, int k0, int num_sub) {
        const uint8_t* row = staged_row<T>(a, buf, n0, group, k0);
        const uint8_t* xs = buf + weight_bytes<kRows>(a);
        const int col0 = warp * kSubK + 8 * quad;   // this lane's 8 columns on step 0
        for_each_step(warp, num_sub, [&](int j, auto odd) {
            const int col = col0 + 4 * kSubK * j;
            int i;
            const uint8_t* block = lane_block<T, decltype(odd)::value>(row, col0, j, i);
            uint32_t w[2][2];                         // B fragments: [mma][k slots 2t.. / 2t+8..]
            if constexpr (T == qformats::kF16) {
                const uint4 h = *reinterpret_cast<const uint4*>(block);
                w[0][0] = h.x; w[0][1] = h.y; w[1][0] = h.z; w[1][1] = h.w;
            } else {
                uint32_t v[4];   // value pairs (0, 1), (2, 3), (4, 5), (6, 7)
                qformats::dequant8_half2_block<T>(block, i, v);
                w[0][0] = v[0]; w[0][1] = v[1]; w[1][0] = v[2]; w[1][1] = v[3];
            }
            const float4* lo = reinterpret_cast<const float4*>(xs + token_lo * x_stride(a) + 4 * col);
            const float4* hi = reinterpret_cast<const float4*>(xs + token_hi * x_stride(a) + 4 * col);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                const float4 l = lo[s], h = hi[s];
                const uint32_t x[4] = {pack_half2(l.x, l.y), pack_half2(h.x, h.y), pack_half2(l.z, l.w),
                                       pack_half2(h.z, h.w)};
                mma_16x8x16(acc, x, w[s][0], w[s][1]);
            }
        });
    });
    qs::pdl_allow_next_kernel();   // the main work is done: the next kernel may start its CTAs
    // acc: tokens group (0, 1) and group + 8 (2, 3), rows 2 * quad and 2 * quad + 1 -> [warp][row][token]
    float* partial = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int e = 0; e < 4; ++e)
        partial[(warp * kRows + 2 * quad + (e & 1)) * kTokens + group + 8 * (e >> 1)] = acc[e];
    __syncthreads();
    write_partials<EPI, kRows, kTokens>(a, partial, n0, m0, num_tokens);
}

}  // namespace linear_mma_detail

// Names linear_mma[_rows|_narrow][_acc|_swiglu]_<type>_g<NG>: NG token groups of 8 per CTA; decode
// tiles also as linear_mma[_narrow]_norm[_swiglu]_<type>_g<NG> (x normalized first).
#define LINEAR_MMA_ENTRIES(TYPE, NAME)                                            \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_split_k, linear_mma, 1)           \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_split_k, linear_mma, 2)           \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_split_k, linear_mma, 4)           \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_rows, linear_mma_rows, 1)         \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_rows, linear_mma_rows, 4)         \
    LINEAR_MMA_EPILOGUES(TYPE, NAME, linear_mma_narrow, linear_mma_narrow, 2)       \
    LINEAR_MMA_NORM_EPILOGUES(TYPE, NAME, linear_mma_split_k, linear_mma, 1)      \
    LINEAR_MMA_NORM_EPILOGUES(TYPE, NAME, linear_mma_narrow, linear_mma_narrow, 2)

QFORMATS_FOR_EACH_TYPE(LINEAR_MMA_ENTRIES)
