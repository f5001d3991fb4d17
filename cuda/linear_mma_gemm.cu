// Tensor-core linear layer for many tokens (batched decode, prefill): the "gemm" CTA layout of
// the arithmetic defined in linear_mma.cu, so its outputs are bitwise those of the other layouts.
//
// x comes as fp16 ([M, K], from f32_to_f16 below: the operand rounding every layout applies),
// so it is staged with plain 16-byte copies and its mma fragments are single shared loads, with
// no conversion in the loop. W stays quantized: its raw bytes are staged, and each warp
// dequantizes exactly the sub-chunks it multiplies, so every weight is dequantized once per CTA.
//
// CTA: 64 (or 32) W rows x 64 tokens, 8 (or 4) warps. Warp w runs accumulator v = w % 4 (the
// sub-chunks c with c % 4 == v, each the same two mmas as in linear_mma.cu) for rows
// 32 * (w / 4) .. + 31 and all 64 tokens; the four accumulators then meet in shared memory in the
// fixed order ((a0 + a1) + a2) + a3. (Warps of 32 rows and 64 accumulator registers, not 64 rows
// and 128: more warps per multiprocessor to hide the shared-memory and dequantization latencies.)
// K runs in chunks of 128 columns (so a sub-chunk's index in the chunk and in K agree mod 4),
// double-buffered with cp.async: chunk c + 1 is in flight while chunk c is multiplied.
#include "linear_mma_common.cuh"

namespace linear_mma_detail {

// A CTA tile: ROWS W rows x TOKENS tokens; 4 warps (one per accumulator) per WARP_ROWS rows.
//   gemm   <64, 32, 64>: 8 warps, 64 accumulator registers per thread (wide matrices)
//   gemm32 <32, 32, 64>: 4 warps; twice the CTAs of gemm
//   gemm16 <16, 16, 32>: 4 warps, 16 accumulator registers per thread: 8x the CTAs of gemm32 for the
//          896-row matrices (q, o, down), whose 28 gemm32 row tiles left most multiprocessors with
//          one CTA: its warps' long K loops were the critical path.
template <int ROWS, int WARP_ROWS, int TOKENS>
struct GemmShape {
    static_assert(ROWS % WARP_ROWS == 0 && WARP_ROWS % 16 == 0 && TOKENS % 8 == 0, "whole mma tiles");
    static constexpr int kRows = ROWS, kWarpRows = WARP_ROWS, kTokens = TOKENS;
    static constexpr int kWarpBlocks = WARP_ROWS / 16;   // 16-row mma blocks per warp
    static constexpr int kTokenGroups = TOKENS / 8;      // 8-token mma blocks
    static constexpr int kWarps = kAccumulators * ROWS / WARP_ROWS, kThreads = 32 * kWarps;
};
constexpr int kGemmChunkCols = 128;
// Shared bytes per x row: 256 of fp16 values + 64 of padding. A lane reads 16 bytes at
// (token g, 16 * quad + 64 * sub); with the stride = 64 (mod 128) the 8 lanes of a quarter-warp
// (tokens g and g + 1) cover the 32 banks once: conflict-free.
constexpr int kGemmXStride = 2 * kGemmChunkCols + 64;

// Raw weight bytes one row needs for a 128-column chunk: the blocks it overlaps (a whole
// super-block for the 256-value K-quants, whose halves are not contiguous), from the 16-byte
// boundary below the first one, rounded up to 16.
template <int T>
__host__ __device__ constexpr int gemm_raw_stride() {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    constexpr int blocks = kValues >= kGemmChunkCols ? 1 : kGemmChunkCols / kValues;
    return (blocks * kBytes + 15 + 15) / 16 * 16;
}
template <int T, typename S>
__host__ __device__ constexpr int gemm_stage_bytes() { return S::kTokens * kGemmXStride + S::kRows * gemm_raw_stride<T>(); }

// Issues the copies of chunk k0 (num_cols columns) into `stage`: the x tile [token][column]
// (tokens past M zero-filled), then each W row's raw bytes at row * raw_stride (rows past N are
// not copied: their products land only in outputs that are never stored).
// Each thread's share is fixed by its index (its 16-byte piece u of every (kThreads / 16)-th token;
// rows warp, warp + kWarps, ... of W), with loop counts known at compile time: this runs once per
// chunk in every warp, and a generic strided loop cost more instructions than the multiply.
template <int T, typename S>
__device__ __forceinline__ void stage_gemm_chunk(const LinearArgs& a, const __half* x16, int n0, int m0,
                                                 int num_tokens, int k0, int num_cols, uint8_t* stage) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    constexpr int kTokenStep = S::kThreads / 16, kRowsPerWarp = S::kRows / S::kWarps;
    constexpr int kRawStride = gemm_raw_stride<T>();
    static_assert(S::kThreads % 16 == 0 && S::kTokens % kTokenStep == 0 && S::kRows % S::kWarps == 0, "fixed shares");
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, u = threadIdx.x & 15;
    if (u < num_cols / 8) {
        const __half* src = x16 + static_cast<long long>(m0) * a.num_cols + k0 + 8 * u;
        uint8_t* dst = stage + 16 * u;
#pragma unroll
        for (int i = 0; i < S::kTokens / kTokenStep; ++i) {
            const int t = (threadIdx.x >> 4) + i * kTokenStep;
            const bool real = t < num_tokens;
            copy16(dst + t * kGemmXStride, real ? src + static_cast<long long>(t) * a.num_cols : src, real ? 16 : 0);
        }
    }
    uint8_t* raw = stage + S::kTokens * kGemmXStride;
    const long long first_block = k0 / kValues, last_block = (k0 + num_cols - 1) / kValues;
    const int chunk_bytes = static_cast<int>((last_block - first_block + 1) * kBytes);
    const uint8_t* chunk0 = a.weight + first_block * kBytes;   // row n's chunk: chunk0 + n * row_bytes
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) {
        const int r = warp + i * S::kWarps;
        if (n0 + r >= a.num_rows) break;
        const uint8_t* begin = chunk0 + static_cast<long long>(n0 + r) * a.row_bytes;
        const int lead = static_cast<int>(reinterpret_cast<uintptr_t>(begin) & 15);   // bytes before begin
        // The row's bytes from its 16-byte boundary below: lead + chunk_bytes <= kRawStride bytes.
        for (int off = 16 * lane; off < lead + chunk_bytes; off += 16 * 32) {
            const int left = lead + chunk_bytes - off;
            copy16(raw + r * kRawStride + off, begin - lead + off, left >= 16 ? 16 : left);
        }
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// acc[rb][j] += W rows row0 + 16rb.. x tokens 8j.. over sub-chunk `sub` of the staged chunk k0. The
// fragments are linear_mma.cu's: lane (group g, quad q) holds columns 8q..8q+7 of its rows and
// of its token, the first four feeding the first mma, the last four the second.
template <int T, typename S>
__device__ __forceinline__ void multiply_gemm_sub_chunk(const LinearArgs& a, const uint8_t* stage, int n0, int row0,
                                                        int k0, int sub, float acc[S::kWarpBlocks][S::kTokenGroups][4]) {
    constexpr int kValues = qformats::BlockInfo<T>::kValues, kBytes = qformats::BlockInfo<T>::kBytes;
    const int lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    uint32_t b[S::kTokenGroups][4];
#pragma unroll
    for (int j = 0; j < S::kTokenGroups; ++j) {
        const uint4 u = *reinterpret_cast<const uint4*>(stage + (8 * j + group) * kGemmXStride + sub * 64 + 16 * quad);
        b[j][0] = u.x; b[j][1] = u.y; b[j][2] = u.z; b[j][3] = u.w;
    }
    // Row r's raw bytes start at (its first block's address % 16); dequant8 takes the row's
    // base, so shift back by the blocks before the chunk and index by the column in K.
    const long long first_block = k0 / kValues;
    const int col = k0 + sub * kSubK + 8 * quad;
    const uint8_t* raw = stage + S::kTokens * kGemmXStride;
#pragma unroll
    for (int rb = 0; rb < S::kWarpBlocks; ++rb) {
        uint32_t frag[2][4];
        uint32_t lo[4], hi[4];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = row0 + 16 * rb + group + 8 * h;
            const long long begin = static_cast<long long>(n0 + r) * a.row_bytes + first_block * kBytes;
            const uint8_t* row = raw + r * gemm_raw_stride<T>() + (begin & 15) - first_block * kBytes;
            qformats::dequant8_half2<T>(row, col, h ? hi : lo);
        }
        pack_a_fragments(lo, hi, frag);
#pragma unroll
        for (int j = 0; j < S::kTokenGroups; ++j) {
            mma_16x8x16(acc[rb][j], frag[0], b[j][0], b[j][1]);
            mma_16x8x16(acc[rb][j], frag[1], b[j][2], b[j][3]);
        }
    }
}

template <int T, int EPI, typename S>
__device__ void linear_mma_gemm(const LinearArgs& a, const __half* x16) {
    extern __shared__ __align__(16) uint8_t smem[];
    const int n0 = blockIdx.x * S::kRows, m0 = blockIdx.y * S::kTokens;
    const int num_tokens = min(S::kTokens, a.num_tokens - m0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int accumulator = warp % kAccumulators, row0 = S::kWarpRows * (warp / kAccumulators);
    float acc[S::kWarpBlocks][S::kTokenGroups][4] = {};

    const int num_chunks = (a.num_cols + kGemmChunkCols - 1) / kGemmChunkCols;
    auto cols_of = [&](int c) { return min(kGemmChunkCols, a.num_cols - c * kGemmChunkCols); };
    auto stage = [&](int c) { return smem + (c & 1) * gemm_stage_bytes<T, S>(); };
    stage_gemm_chunk<T, S>(a, x16, n0, m0, num_tokens, 0, cols_of(0), stage(0));
    for (int c = 0; c < num_chunks; ++c) {
        if (c + 1 < num_chunks) {   // stage (c + 1) & 1 was released by the barrier ending chunk c - 1
            stage_gemm_chunk<T, S>(a, x16, n0, m0, num_tokens, (c + 1) * kGemmChunkCols, cols_of(c + 1), stage(c + 1));
            asm volatile("cp.async.wait_group 1;\n" ::: "memory");
        } else {
            asm volatile("cp.async.wait_group 0;\n" ::: "memory");
        }
        __syncthreads();
        // This warp's sub-chunks of chunk c: index v (+ 4 ...) in the chunk, c * 4 + v in K.
        for (int sub = accumulator; sub < cols_of(c) / kSubK; sub += kAccumulators)
            multiply_gemm_sub_chunk<T, S>(a, stage(c), n0, row0, c * kGemmChunkCols, sub, acc);
        __syncthreads();
    }

    auto total_of = [&](int row, int token) { return reinterpret_cast<const float*>(smem)[row * S::kTokens + token]; };
    // totals[row][token] = ((a0 + a1) + a2) + a3: the warps of accumulator v add theirs in turn.
    float* totals = reinterpret_cast<float*>(smem);
    for (int v = 0; v < kAccumulators; ++v) {
        if (accumulator == v) {
#pragma unroll
            for (int rb = 0; rb < S::kWarpBlocks; ++rb)
#pragma unroll
                for (int j = 0; j < S::kTokenGroups; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = row0 + 16 * rb + group + 8 * (e >> 1);
                        float& total = totals[row * S::kTokens + 8 * j + 2 * quad + (e & 1)];
                        total = v == 0 ? acc[rb][j][e] : __fadd_rn(total, acc[rb][j][e]);
                    }
        }
        __syncthreads();
    }
    write_tile<EPI, S::kRows, decltype(total_of), S::kThreads>(a, n0, m0, num_tokens, total_of);
}

}  // namespace linear_mma_detail

// y = fp16(x), n % 8 == 0, 16-byte aligned: the gemm layout's operand, rounded as every layout
// rounds x (round to nearest even; beyond 65504 -> inf).
extern "C" __global__ void f32_to_f16(const float* x, __half* y, long long n) {
    for (long long i = 8LL * (blockIdx.x * blockDim.x + threadIdx.x); i < n; i += 8LL * gridDim.x * blockDim.x) {
        const float4 lo = *reinterpret_cast<const float4*>(x + i), hi = *reinterpret_cast<const float4*>(x + i + 4);
        *reinterpret_cast<uint4*>(y + i) = make_uint4(
            linear_mma_detail::pack_half2(lo.x, lo.y), linear_mma_detail::pack_half2(lo.z, lo.w),
            linear_mma_detail::pack_half2(hi.x, hi.y), linear_mma_detail::pack_half2(hi.z, hi.w));
    }
}

// linear_mma_gemm{,32,16}[_acc|_swiglu]_<type>_g{8,8,4} (GemmShape above; g = token groups of 8
// per CTA): the linear_mma parameter list, with x ([M, K] fp16) in the place of the fp32 x;
// chunk_cols, chunk_stride and x_rows are unused (fixed tiles). At most 128 registers per thread:
// 2048 threads' worth of CTAs per multiprocessor.
#define LINEAR_MMA_GEMM_ENTRY(TYPE, NAME, PREFIX, EPI, SHAPE, NG)                                        \
    extern "C" __global__ void __launch_bounds__(SHAPE::kThreads, 512 / SHAPE::kThreads)                 \
    PREFIX##NAME##_g##NG(const uint8_t* weight, int row_bytes, int num_rows, int num_cols, int chunk_cols, \
                         int chunk_stride, int x_rows, const __half* x16, float* y, int num_tokens,       \
                         int y_stride) {                                                                  \
        const linear_mma_detail::LinearArgs args{weight, row_bytes, num_rows, num_cols, chunk_cols,      \
                                                 chunk_stride, x_rows, nullptr, y, num_tokens, y_stride}; \
        linear_mma_detail::linear_mma_gemm<TYPE, EPI, SHAPE>(args, x16);                                 \
    }
#define LINEAR_MMA_GEMM_EPILOGUES(TYPE, NAME, PREFIX, SHAPE, NG)                                      \
    LINEAR_MMA_GEMM_ENTRY(TYPE, NAME, PREFIX##_, linear_mma_detail::kStore, SHAPE, NG)                \
    LINEAR_MMA_GEMM_ENTRY(TYPE, NAME, PREFIX##_acc_, linear_mma_detail::kAccumulate, SHAPE, NG)       \
    LINEAR_MMA_GEMM_ENTRY(TYPE, NAME, PREFIX##_swiglu_, linear_mma_detail::kSwiGLU, SHAPE, NG)

namespace linear_mma_detail {
using GemmTile64 = GemmShape<64, 32, 64>;
using GemmTile32 = GemmShape<32, 32, 64>;
using GemmTile16 = GemmShape<16, 16, 32>;
}  // namespace linear_mma_detail

#define LINEAR_MMA_GEMM_ENTRIES(TYPE, NAME)                                                   \
    LINEAR_MMA_GEMM_EPILOGUES(TYPE, NAME, linear_mma_gemm, linear_mma_detail::GemmTile64, 8)   \
    LINEAR_MMA_GEMM_EPILOGUES(TYPE, NAME, linear_mma_gemm32, linear_mma_detail::GemmTile32, 8) \
    LINEAR_MMA_GEMM_EPILOGUES(TYPE, NAME, linear_mma_gemm16, linear_mma_detail::GemmTile16, 4)

QFORMATS_FOR_EACH_TYPE(LINEAR_MMA_GEMM_ENTRIES)
