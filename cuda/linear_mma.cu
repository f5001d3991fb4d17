// Tensor-core linear layer for any number of tokens: y[m, n] = sum_k x[m, k] * W[n, k].
//
// W: [N, K] in any GGUF format (quant_formats.cuh), x: [M, K] fp32, y: [M, N] fp32, K % 32 == 0.
// Operands are rounded to fp16 (x as read, W after dequantization), products are summed in fp32 by
// mma.sync m16n8k16: W rows are the mma's M (16 rows), tokens its N (8 tokens), so one kernel is
// bandwidth-bound at a single token and compute-bound at thousands.
//
// A CTA (4 warps) owns 16 * R rows of W and 8 * NG tokens. It stages its rows' bytes
// global -> shared with 16-byte cp.async in K chunks, double-buffered (the next chunk is in flight
// while this one is multiplied). Warp w takes the 32-column sub-chunks c with c % 4 == w: each lane
// dequantizes 8 consecutive values of 2 rows per m-tile (dequant8, the same unit every kernel uses)
// and reads the same 8 columns of x for its token. The mma's 16 k slots are a fixed permutation of
// the 32 columns (lane t's 8 columns feed slots {2t, 2t+1, 2t+8, 2t+9} of two mmas); A and B use the
// same permutation, so the products are the same as in column order. The 4 warps' partial sums are
// added in shared memory in warp order, then the epilogue stores, accumulates (y += W x: the
// residual stream) or applies SwiGLU to interleaved gate/up rows (y[m, i] = silu(g_i) * u_i).
//
// Batch invariance: y[m, n] is the sum over warps 0..3 (in that order) of each warp's mma chain
// over its sub-chunks in increasing k; that depends on (K, type) only, never on M, the token's
// place in the tile, NG, R, the chunk width or the grid, so a token gets bitwise the same output
// alone, batched or in a prefill chunk. (It is not bitwise equal to matvec.cu's fp32 result.)
// Values of x beyond fp16's range (|x| > 65504) become inf, as in any fp16 GEMM.
#include "quant_formats.cuh"

namespace linear_mma_detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kSubK = 32;          // columns per warp step (two k16 mmas)
enum Epilogue : int { kStore = 0, kAccumulate = 1, kSwiGLU = 2 };

struct LinearArgs {
    const uint8_t* weight;  // [N, row_bytes]
    int row_bytes;
    int num_rows;           // N
    int num_cols;           // K
    int chunk_cols;         // K columns per staged chunk: K itself, or a multiple of 128 and of the block
    int chunk_stride;       // shared bytes per staged row chunk (16-byte multiple, + 16 of alignment slack)
    const float* x;         // [M, K]
    float* y;               // [M, N], or [M, N / 2] for SwiGLU
    int num_tokens;         // M
};

// Issues the cp.async copies of chunk `k0` (columns [k0, k0 + chunk_cols) clipped to K) of rows
// [n0, n0 + rows) into buf, row r at buf + r * chunk_stride (from its 16-byte boundary below).
template <int T>
__device__ __forceinline__ void stage_chunk(const LinearArgs& a, int n0, int rows, int k0, uint8_t* buf) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    const int num_cols = min(a.chunk_cols, a.num_cols - k0);
    const long long chunk_offset = static_cast<long long>(k0 / kValues) * kBytes;
    const long long chunk_bytes = static_cast<long long>(num_cols / kValues) * kBytes;
    const int vecs_per_row = a.chunk_stride / 16;
    for (int idx = threadIdx.x; idx < rows * vecs_per_row; idx += kThreads) {
        const int r = idx / vecs_per_row, c = idx % vecs_per_row;
        if (n0 + r >= a.num_rows) continue;
        const long long begin = static_cast<long long>(n0 + r) * a.row_bytes + chunk_offset;
        const long long end = begin + chunk_bytes;
        const long long src = (begin & ~15LL) + 16LL * c;
        if (src >= end) continue;
        const int src_size = end - src >= 16 ? 16 : int(end - src);   // zero-fill past the chunk
        const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(buf + r * a.chunk_stride + 16 * c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(dst), "l"(a.weight + src), "r"(src_size));
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);   // lo -> low 16 bits = the lower k slot
    return *reinterpret_cast<const uint32_t*>(&h);
}

// acc += A (16 x 16, row-major fragments) * B (16 x 8, column fragments), fp32 accumulators.
__device__ __forceinline__ void mma_16x8x16(float acc[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// One warp's products over its sub-chunks of the staged chunk at k0.
template <int T, int NG, int R>
__device__ __forceinline__ void multiply_chunk(const LinearArgs& a, const uint8_t* buf, int n0, int m0,
                                               int num_groups, int k0, float acc[R][NG][4]) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = lane >> 2, quad = lane & 3;
    const long long chunk_offset = static_cast<long long>(k0 / kValues) * kBytes;
    // Rows 16 i + group and 16 i + group + 8 of the tile; rows past N read stale shared bytes,
    // whose products land only in rows that are never stored.
    const uint8_t* rows[R][2];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = 16 * i + group + 8 * h;
            const long long begin = static_cast<long long>(n0 + r) * a.row_bytes + chunk_offset;
            rows[i][h] = buf + r * a.chunk_stride + (begin & 15);
        }
    const int num_sub = min(a.chunk_cols, a.num_cols - k0) / kSubK;
#pragma unroll 2
    for (int sub = warp; sub < num_sub; sub += kWarps) {
        const int col = sub * kSubK + 8 * quad;   // this lane's 8 columns, relative to k0
        uint32_t frag[R][2][4];
#pragma unroll
        for (int i = 0; i < R; ++i) {
            float lo[8], hi[8];   // rows group and group + 8
            qformats::dequant8<T>(rows[i][0], col, lo);
            qformats::dequant8<T>(rows[i][1], col, hi);
#pragma unroll
            for (int s = 0; s < 2; ++s) {
                frag[i][s][0] = pack_half2(lo[4 * s], lo[4 * s + 1]);
                frag[i][s][1] = pack_half2(hi[4 * s], hi[4 * s + 1]);
                frag[i][s][2] = pack_half2(lo[4 * s + 2], lo[4 * s + 3]);
                frag[i][s][3] = pack_half2(hi[4 * s + 2], hi[4 * s + 3]);
            }
        }
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            if (j >= num_groups) break;
            const int token = min(m0 + 8 * j + group, a.num_tokens - 1);   // padding repeats a token
            const float4* xp = reinterpret_cast<const float4*>(
                a.x + static_cast<long long>(token) * a.num_cols + k0 + col);
            const float4 x0 = __ldg(xp), x1 = __ldg(xp + 1);
#pragma unroll
            for (int i = 0; i < R; ++i) {
                mma_16x8x16(acc[i][j], frag[i][0], pack_half2(x0.x, x0.y), pack_half2(x0.z, x0.w));
                mma_16x8x16(acc[i][j], frag[i][1], pack_half2(x1.x, x1.y), pack_half2(x1.z, x1.w));
            }
        }
    }
}

template <int EPI>
__device__ __forceinline__ void write_output(const LinearArgs& a, int m, int n, float total, float next_total) {
    const long long m64 = m;
    if (EPI == kStore) {
        a.y[m64 * a.num_rows + n] = total;
    } else if (EPI == kAccumulate) {
        a.y[m64 * a.num_rows + n] = __fadd_rn(a.y[m64 * a.num_rows + n], total);
    } else {   // SwiGLU: row n is gate_i, row n + 1 is up_i, i = n / 2
        const float silu = __fdiv_rn(total, __fadd_rn(1.0f, expf(-total)));
        a.y[m64 * (a.num_rows / 2) + n / 2] = __fmul_rn(silu, next_total);
    }
}

template <int T, int NG, int R, int EPI>
__device__ void linear_mma(const LinearArgs& a) {
    extern __shared__ __align__(16) uint8_t smem[];
    constexpr int kRows = 16 * R, kTokens = 8 * NG;
    const int n0 = blockIdx.x * kRows, m0 = blockIdx.y * kTokens;
    const int num_groups = min(NG, (a.num_tokens - m0 + 7) / 8);
    const int num_chunks = (a.num_cols + a.chunk_cols - 1) / a.chunk_cols;
    uint8_t* buffers[2] = {smem, smem + kRows * a.chunk_stride};

    float acc[R][NG][4];
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < NG; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

    stage_chunk<T>(a, n0, kRows, 0, buffers[0]);
    for (int c = 0; c < num_chunks; ++c) {
        if (c + 1 < num_chunks) {   // buffer (c + 1) & 1 was released by the barrier ending chunk c - 1
            stage_chunk<T>(a, n0, kRows, (c + 1) * a.chunk_cols, buffers[(c + 1) & 1]);
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        multiply_chunk<T, NG, R>(a, buffers[c & 1], n0, m0, num_groups, c * a.chunk_cols, acc);
        __syncthreads();
    }

    // Per-warp partial sums -> shared [warp][row][token], then summed in warp order.
    float* partial = reinterpret_cast<float*>(smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, group = lane >> 2, quad = lane & 3;
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < NG; ++j) {
            if (j >= num_groups) break;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = 16 * i + group + 8 * (e >> 1), token = 8 * j + 2 * quad + (e & 1);
                partial[(warp * kRows + row) * kTokens + token] = acc[i][j][e];
            }
        }
    __syncthreads();
    auto total_of = [&](int row, int token) {
        float sum = partial[row * kTokens + token];
#pragma unroll
        for (int w = 1; w < kWarps; ++w) sum = __fadd_rn(sum, partial[(w * kRows + row) * kTokens + token]);
        return sum;
    };
    for (int idx = threadIdx.x; idx < kRows * kTokens; idx += kThreads) {
        const int row = idx % kRows, token = idx / kRows, n = n0 + row, m = m0 + token;
        if (n >= a.num_rows || m >= a.num_tokens) continue;
        if (EPI == kSwiGLU) {
            if (row & 1) continue;
            write_output<EPI>(a, m, n, total_of(row, token), total_of(row + 1, token));
        } else {
            write_output<EPI>(a, m, n, total_of(row, token), 0.0f);
        }
    }
}

}  // namespace linear_mma_detail

// Plain scalar parameters (PyCUDA prepared-call format "PiiiiiPPi"); names
// linear_mma[_acc|_swiglu]_<type>_g<NG>_r<R>: NG token groups of 8, R row tiles of 16 per CTA.
#define LINEAR_MMA_ENTRY(TYPE, NAME, PREFIX, EPI, NG, R)                                          \
    extern "C" __global__ void __launch_bounds__(linear_mma_detail::kThreads)                     \
    PREFIX##NAME##_g##NG##_r##R(const uint8_t* weight, int row_bytes, int num_rows, int num_cols, \
                                int chunk_cols, int chunk_stride, const float* x, float* y,       \
                                int num_tokens) {                                                 \
        const linear_mma_detail::LinearArgs args{weight, row_bytes, num_rows, num_cols,           \
                                                 chunk_cols, chunk_stride, x, y, num_tokens};     \
        linear_mma_detail::linear_mma<TYPE, NG, R, EPI>(args);                                    \
    }
#define LINEAR_MMA_SHAPES(TYPE, NAME, PREFIX, EPI)  \
    LINEAR_MMA_ENTRY(TYPE, NAME, PREFIX, EPI, 1, 1)  \
    LINEAR_MMA_ENTRY(TYPE, NAME, PREFIX, EPI, 4, 1)  \
    LINEAR_MMA_ENTRY(TYPE, NAME, PREFIX, EPI, 8, 2)
#define LINEAR_MMA_ENTRIES(TYPE, NAME)                                              \
    LINEAR_MMA_SHAPES(TYPE, NAME, linear_mma_, linear_mma_detail::kStore)           \
    LINEAR_MMA_SHAPES(TYPE, NAME, linear_mma_acc_, linear_mma_detail::kAccumulate)  \
    LINEAR_MMA_SHAPES(TYPE, NAME, linear_mma_swiglu_, linear_mma_detail::kSwiGLU)

QFORMATS_FOR_EACH_TYPE(LINEAR_MMA_ENTRIES)
