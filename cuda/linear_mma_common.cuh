// What the tensor-core linear layouts (linear_mma.cu, linear_mma_gemm.cu) share: the argument
// block, the output epilogues (store, accumulate, SwiGLU) and the extern "C" entry macro; the mma
// instruction and the fp16 packing come from mma.cuh. The arithmetic contract is spelled out in
// linear_mma.cu; every layout must run exactly it.
#pragma once
#include "common.cuh"
#include "mma.cuh"
#include "quant_formats.cuh"

namespace linear_mma_detail {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kSubK = 32;          // columns per sub-chunk (two k16 mmas)
constexpr int kAccumulators = 4;   // sub-chunk c feeds accumulator c % 4
enum Epilogue : int { kStore = 0, kAccumulate = 1, kSwiGLU = 2 };

struct LinearArgs {
    const uint8_t* weight;  // [N, row_bytes]
    int row_bytes;
    int num_rows;           // N
    int num_cols;           // K
    int chunk_cols;         // K columns per staged chunk: K itself, or a multiple of 128 and of the block
    int chunk_stride;       // shared bytes per staged weight row chunk (16-byte multiple, + 16 of alignment
                            // slack); row_bytes when chunk_cols == K (whole rows, copied flat)
    int x_rows;             // token rows of the x buffer: min(8 * NG, M)
    const float* x;         // [M, K]
    float* y;               // [M, y_stride]: columns [0, N), or [0, N / 2) for SwiGLU
    int num_tokens;         // M
    int y_stride;           // floats per row of y
    const float* norm_weight = nullptr;   // *_norm_* kernels: RMSNorm gain [K] applied to x first
    float norm_eps = 0.0f;
    __half* y16 = nullptr;  // f16gemm SwiGLU: [M, y16_stride] fp16 copy of y in slot order (down's input), or null
    int y16_stride = 0;
};

using qs::ldmatrix_x4;
using qs::mma_16x8x16;
using qs::pack_half2;

// 16 bytes global -> shared without registers; bytes past src_size are zero-filled.
__device__ __forceinline__ void copy16(uint8_t* dst, const void* src, int src_size) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(d), "l"(src), "r"(src_size));
}

// One warp (this thread is `lane`) copies bytes [begin, end) of `weight` to dst, starting from the
// 16-byte boundary at or below begin (dst receives begin - (begin & ~15) leading bytes first).
__device__ __forceinline__ void copy_bytes_warp(uint8_t* dst, const uint8_t* weight, long long begin, long long end,
                                                int lane) {
    const long long first = begin & ~15LL;
    for (long long src = first + 16LL * lane; src < end; src += 16LL * 32)
        copy16(dst + (src - first), weight + src, end - src >= 16 ? 16 : int(end - src));
}

// The A fragments of one 32-column sub-chunk from a lane's 8 dequantized values of rows g (lo) and
// g + 8 (hi), as fp16 pairs (qformats::dequant8_half2): the first four columns feed the first mma,
// the last four the second.
__device__ __forceinline__ void pack_a_fragments(const uint32_t lo[4], const uint32_t hi[4], uint32_t frag[2][4]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
        frag[s][0] = lo[2 * s];
        frag[s][1] = hi[2 * s];
        frag[s][2] = lo[2 * s + 1];
        frag[s][3] = hi[2 * s + 1];
    }
}

template <int EPI>
__device__ __forceinline__ void write_output(const LinearArgs& a, int m, int n, float total, float next_total) {
    const long long row = static_cast<long long>(m) * a.y_stride;
    if (EPI == kStore) {
        a.y[row + n] = total;
    } else if (EPI == kAccumulate) {
        a.y[row + n] = __fadd_rn(a.y[row + n], total);
    } else {   // SwiGLU: row n is gate_i, row n + 1 is up_i, i = n / 2
        const float silu = __fdiv_rn(total, __fadd_rn(1.0f, expf(-total)));
        const float value = __fmul_rn(silu, next_total);
        a.y[row + n / 2] = value;
        if (a.y16) a.y16[static_cast<long long>(m) * a.y16_stride + qs::slot_position(n / 2)] = __float2half_rn(value);
    }
}

// Writes the CTA's [ROWS, num_tokens] totals (total_of(row, token)) through the epilogue; rows of
// one thread are consecutive, so SwiGLU pairs (even row, odd row) meet in one thread.
template <int EPI, int ROWS, typename TotalOf, int THREADS = kThreads>
__device__ __forceinline__ void write_tile(const LinearArgs& a, int n0, int m0, int num_tokens, TotalOf total_of) {
    for (int idx = threadIdx.x; idx < ROWS * num_tokens; idx += THREADS) {
        const int row = idx % ROWS, token = idx / ROWS, n = n0 + row;
        if (n >= a.num_rows) continue;
        if (EPI == kSwiGLU) {
            if (row & 1) continue;
            write_output<EPI>(a, m0 + token, n, total_of(row, token), total_of(row + 1, token));
        } else {
            write_output<EPI>(a, m0 + token, n, total_of(row, token), 0.0f);
        }
    }
}

}  // namespace linear_mma_detail

// Plain scalar parameters (PyCUDA prepared-call format "PiiiiiiPPii"), the same for every layout.
#define LINEAR_MMA_ENTRY(TYPE, NAME, LAYOUT, PREFIX, EPI, NG)                                       \
    extern "C" __global__ void __launch_bounds__(linear_mma_detail::kThreads)                       \
    PREFIX##NAME##_g##NG(const uint8_t* weight, int row_bytes, int num_rows, int num_cols,          \
                         int chunk_cols, int chunk_stride, int x_rows, const float* x, float* y,    \
                         int num_tokens, int y_stride) {                                            \
        const linear_mma_detail::LinearArgs args{weight, row_bytes, num_rows, num_cols, chunk_cols, \
                                                 chunk_stride, x_rows, x, y, num_tokens, y_stride}; \
        linear_mma_detail::LAYOUT<TYPE, NG, EPI>(args);                                             \
    }
// The same with x normalized first (RMSNorm with gain norm_weight, linear_mma.cu): format "PiiiiiiPPiiPf".
#define LINEAR_MMA_NORM_ENTRY(TYPE, NAME, LAYOUT, PREFIX, EPI, NG)                                  \
    extern "C" __global__ void __launch_bounds__(linear_mma_detail::kThreads)                       \
    PREFIX##NAME##_g##NG(const uint8_t* weight, int row_bytes, int num_rows, int num_cols,          \
                         int chunk_cols, int chunk_stride, int x_rows, const float* x, float* y,    \
                         int num_tokens, int y_stride, const float* norm_weight, float norm_eps) {  \
        const linear_mma_detail::LinearArgs args{weight, row_bytes, num_rows, num_cols, chunk_cols, \
                                                 chunk_stride, x_rows, x, y, num_tokens, y_stride,  \
                                                 norm_weight, norm_eps};                            \
        linear_mma_detail::LAYOUT<TYPE, NG, EPI, true>(args);                                       \
    }
#define LINEAR_MMA_NORM_EPILOGUES(TYPE, NAME, LAYOUT, PREFIX, NG)                                   \
    LINEAR_MMA_NORM_ENTRY(TYPE, NAME, LAYOUT, PREFIX##_norm_, linear_mma_detail::kStore, NG)         \
    LINEAR_MMA_NORM_ENTRY(TYPE, NAME, LAYOUT, PREFIX##_norm_swiglu_, linear_mma_detail::kSwiGLU, NG)
#define LINEAR_MMA_EPILOGUES(TYPE, NAME, LAYOUT, PREFIX, NG)                                        \
    LINEAR_MMA_ENTRY(TYPE, NAME, LAYOUT, PREFIX##_, linear_mma_detail::kStore, NG)                   \
    LINEAR_MMA_ENTRY(TYPE, NAME, LAYOUT, PREFIX##_acc_, linear_mma_detail::kAccumulate, NG)          \
    LINEAR_MMA_ENTRY(TYPE, NAME, LAYOUT, PREFIX##_swiglu_, linear_mma_detail::kSwiGLU, NG)
