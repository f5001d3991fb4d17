// Tensor-core GEMM for prefill and large batches: y[m, n] = sum_k x[m, k] * W[n, k].
//
// x: [M, K] fp32, W: [N, K] any GGUF format, y: [M, N] fp32; K a multiple of 32.
// A CTA (4 warps, 2 x 2) owns a TILE_M x 64 tile of y (TILE_M = 64, or 32 for the `_m32` kernels
// that the launcher picks when 64-row tiles would leave SMs idle). Per 128-wide K step it converts
// its x tile to fp16 and dequantizes its W tile (64 rows x 128 values = 1024 units of 8) to fp16 in
// shared memory; each warp then runs (TILE_M / 32) x 2 wmma 16x16x16 fragments, fp32 accumulators.
//
// Batch invariance: y[m, n] accumulates over K in one fixed order (16-deep mma in increasing k,
// whatever the step width), and no row of x influences another row's result, so a
// token's output is the same for any M, M tile, or split of a prompt into chunks. (It is NOT
// bitwise equal to matvec.cu's fp32 result: fp16 operands.) Out-of-range x values (> 65504)
// become inf in fp16, as in any fp16 GEMM.
#include <mma.h>
#include "quant_formats.cuh"

namespace gemm_detail {

// 128-wide K steps: few barriers and many independent loads in flight per step (the kernel is
// bound by load latency at prefill sizes). The mma order over K is the same for any step width.
constexpr int kTileN = 64, kTileK = 128, kThreads = 128;
constexpr int kPadK = kTileK + 8;   // halves per smem row: 272 bytes, keeps wmma 32-byte alignment
constexpr int kPadN = kTileN + 4;   // floats per smem row of the output tile

struct GemmArgs {
    const uint8_t* weight;  // [N, row_bytes]
    int row_bytes, num_rows, num_cols;  // N, K
    const float* x;         // [M, K]
    float* y;               // [M, N]
    int num_tokens;         // M
};

// x[m0 : m0 + TILE_M, k0 : k0 + 128] -> fp16, zeros past M and K. TILE_M * 32 float4s.
template <int TILE_M>
__device__ __forceinline__ void load_x_tile(const GemmArgs& a, int m0, int k0, __half (*tile)[kPadK]) {
    constexpr int kVecsPerRow = kTileK / 4;
#pragma unroll
    for (int i = 0; i < TILE_M * kVecsPerRow / kThreads; ++i) {
        const int idx = threadIdx.x + kThreads * i, r = idx / kVecsPerRow, c = 4 * (idx % kVecsPerRow);
        float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
        if (m0 + r < a.num_tokens && k0 + c < a.num_cols)
            v = __ldg(reinterpret_cast<const float4*>(a.x + static_cast<long long>(m0 + r) * a.num_cols + k0 + c));
        tile[r][c + 0] = __float2half_rn(v.x); tile[r][c + 1] = __float2half_rn(v.y);
        tile[r][c + 2] = __float2half_rn(v.z); tile[r][c + 3] = __float2half_rn(v.w);
    }
}

// W[n0 : n0 + 64, k0 : k0 + 128] dequantized -> fp16, zeros past N and K. 8 units of 8 per thread.
template <int T>
__device__ __forceinline__ void load_w_tile(const GemmArgs& a, int n0, int k0, __half (*tile)[kPadK]) {
    constexpr int kUnitsPerRow = kTileK / 8;
#pragma unroll
    for (int i = 0; i < kTileN * kUnitsPerRow / kThreads; ++i) {
        const int unit = threadIdx.x + kThreads * i, r = unit / kUnitsPerRow, c = 8 * (unit % kUnitsPerRow);
        float w[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        if (n0 + r < a.num_rows && k0 + c < a.num_cols)
            qformats::dequant8<T>(a.weight + static_cast<long long>(n0 + r) * a.row_bytes, k0 + c, w);
#pragma unroll
        for (int j = 0; j < 8; ++j) tile[r][c + j] = __float2half_rn(w[j]);
    }
}

template <int T, int TILE_M>
__device__ void gemm(const GemmArgs& a) {
    using namespace nvcuda;
    constexpr int kFragM = TILE_M / 32;   // 16-row fragments per warp in M
    // The output tile reuses the operand tiles' shared memory (52 KB together would exceed 48 KB).
    constexpr int kOperandBytes = (TILE_M + kTileN) * kPadK * 2, kOutputBytes = TILE_M * kPadN * 4;
    __shared__ __align__(128) uint8_t smem[kOperandBytes > kOutputBytes ? kOperandBytes : kOutputBytes];
    auto x_tile = reinterpret_cast<__half (*)[kPadK]>(smem);
    auto w_tile = reinterpret_cast<__half (*)[kPadK]>(smem + TILE_M * kPadK * 2);
    auto y_tile = reinterpret_cast<float (*)[kPadN]>(smem);
    const int n0 = blockIdx.x * kTileN, m0 = blockIdx.y * TILE_M;
    const int warp = threadIdx.x / 32, warp_m = (TILE_M / 2) * (warp / 2), warp_n = 32 * (warp % 2);

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragM][2];
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    for (int k0 = 0; k0 < a.num_cols; k0 += kTileK) {
        load_x_tile<TILE_M>(a, m0, k0, x_tile);
        load_w_tile<T>(a, n0, k0, w_tile);
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < kTileK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> xf[kFragM];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> wf[2];
#pragma unroll
            for (int i = 0; i < kFragM; ++i) wmma::load_matrix_sync(xf[i], &x_tile[warp_m + 16 * i][kk], kPadK);
#pragma unroll
            for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(wf[j], &w_tile[warp_n + 16 * j][kk], kPadK);
#pragma unroll
            for (int i = 0; i < kFragM; ++i)
#pragma unroll
                for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], xf[i], wf[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
            wmma::store_matrix_sync(&y_tile[warp_m + 16 * i][warp_n + 16 * j], acc[i][j], kPadN,
                                    wmma::mem_row_major);
    __syncthreads();
    for (int idx = threadIdx.x; idx < TILE_M * kTileN; idx += kThreads) {
        const int r = idx / kTileN, c = idx % kTileN;
        if (m0 + r < a.num_tokens && n0 + c < a.num_rows)
            a.y[static_cast<long long>(m0 + r) * a.num_rows + n0 + c] = y_tile[r][c];
    }
}

}  // namespace gemm_detail

// PyCUDA prepared-call format "PiiiPPi"; grid = (ceil(N / 64), ceil(M / TILE_M)), block = 128.
#define QFORMATS_GEMM_ENTRY(TYPE, NAME, SUFFIX, TILE_M)                                        \
    extern "C" __global__ void __launch_bounds__(128) gemm_##NAME##SUFFIX(                     \
        const uint8_t* weight, int row_bytes, int num_rows, int num_cols, const float* x,      \
        float* y, int num_tokens) {                                                            \
        const gemm_detail::GemmArgs args{weight, row_bytes, num_rows, num_cols, x, y,          \
                                         num_tokens};                                          \
        gemm_detail::gemm<TYPE, TILE_M>(args);                                                 \
    }
#define QFORMATS_GEMM_ENTRIES(TYPE, NAME)          \
    QFORMATS_GEMM_ENTRY(TYPE, NAME, , 64)          \
    QFORMATS_GEMM_ENTRY(TYPE, NAME, _m32, 32)

QFORMATS_FOR_EACH_TYPE(QFORMATS_GEMM_ENTRIES)
