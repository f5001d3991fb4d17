// Tensor-core linear layer for many tokens from fp16 copies of both operands: the "f16gemm" CTA
// layout of the arithmetic defined in linear_mma.cu, so its outputs are bitwise those of every
// other layout (a token's result never depends on the layout the launcher picks).
//
// Why a separate pass: linear_mma_gemm.cu dequantizes W inside the multiply loop, once per CTA,
// i.e. once per 64-token tile; at hundreds of tokens that integer work, not the tensor cores, sets
// the pace. Here a memory-bound pass (dequant_slots_<type>) writes W as fp16 once per launch into a
// scratch (the launcher cuts tall matrices such as the LM head into row slices that fit it), and
// the multiply reads only fp16: ldmatrix fragments from swizzled shared tiles, a 3-stage cp.async
// pipeline (two CTAs per multiprocessor), one barrier per 128-column chunk. (6 stages, one CTA per
// multiprocessor, measured no faster on an H200 even for grids of a few dozen CTAs.)
//
// "Slot order": both copies store each 32-column sub-chunk in the order in which the arithmetic
// feeds the sub-chunk's columns to its two mmas (k slots 0..15 of the first, then of the second).
// Lane quad q of linear_mma.cu feeds columns 8q + 4m + {0, 1} to slots {2q, 2q + 1} of mma m and
// 8q + 4m + {2, 3} to slots {2q + 8, 2q + 9}. In 32-bit words (column pairs) of a sub-chunk: the
// pair 8q + 2i, 8q + 2i + 1 (i = 0..3) goes to word 4i + q. A plain ldmatrix of slot-ordered
// rows then yields exactly linear_mma.cu's fragments.
//
// CTA (F16Tile<RB, TG>): 32 * RB W rows x 8 * TG tokens, 8 warps. Warp w runs accumulator
// v = w % 4 (sub-chunk v of each 128-column chunk, i.e. the sub-chunks c with c % 4 == v, in
// increasing c) for rows 16 * RB * (w / 4) .. + 16 * RB - 1 and all the CTA's tokens; the four
// accumulators meet in shared memory in the fixed order ((a0 + a1) + a2) + a3, as in
// linear_mma_gemm.cu. 64 x 64 tiles for wide matrices; the 896-row ones (q, o, down) have too
// few of those to fill the GPU, and there a CTA's chain of chunks sets the time, so their smaller
// tiles give each warp half or a quarter of the work per chunk and the GPU 2-4x the CTAs.
#include "linear_mma_common.cuh"

namespace linear_mma_detail {

constexpr int kF16Threads = 256;                          // 8 warps: 2 row groups x 4 accumulators
constexpr int kF16ChunkCols = 128;                        // one 32-column sub-chunk per accumulator
constexpr int kF16RowBytes = 2 * kF16ChunkCols;           // one tile row: 16 pieces of 16 bytes
constexpr int kF16Stages = 3;                             // chunks c + 1 and c + 2 in flight during c
static_assert(kF16ChunkCols == kAccumulators * kSubK, "one sub-chunk per accumulator and chunk");

template <int RB, int TG>
struct F16Tile {
    static constexpr int kRows = 32 * RB, kTokens = 8 * TG;
    static constexpr int kWarpRows = 16 * RB;
    static constexpr int kWBytes = kRows * kF16RowBytes;                   // W tile, then the x tile
    static constexpr int kStageBytes = (kRows + kTokens) * kF16RowBytes;
    // totals[token][row], 4 floats of padding per token (stride = 4 mod 32): the accumulator stores
    // (lanes: 8 rows x 4 token pairs) and write_tile's loads (consecutive rows) hit 32 banks.
    static constexpr int kTotalsStride = kRows + 4;
    static constexpr int kSharedBytes = kF16Stages * kStageBytes;
    static_assert(kTokens * kTotalsStride * sizeof(float) <= kSharedBytes, "the totals reuse the stages");
    static_assert(TG % 2 == 0, "B fragments come two 8-token groups per ldmatrix");
};

// Writes one lane-quad's 8 values (natural columns 8q .. 8q + 7 of a sub-chunk), as fp16 pairs,
// in slot order.
__device__ __forceinline__ void write_slot_pairs(__half* sub_chunk, int quad, const uint32_t pairs[4]) {
    uint32_t* words = reinterpret_cast<uint32_t*>(sub_chunk);
#pragma unroll
    for (int i = 0; i < 4; ++i) words[4 * i + quad] = pairs[i];
}

__device__ __forceinline__ void write_slot_words(__half* sub_chunk, int quad, const float v[8]) {
    const uint32_t pairs[4] = {pack_half2(v[0], v[1]), pack_half2(v[2], v[3]), pack_half2(v[4], v[5]),
                               pack_half2(v[6], v[7])};
    write_slot_pairs(sub_chunk, quad, pairs);
}

// Byte offset of 16-byte piece `piece` (0..15) of tile row `row`: the piece index is XORed with
// row % 8, so the 8 rows one ldmatrix matrix reads (same piece) fall on 8 different bank groups.
__device__ __forceinline__ int swizzled(int row, int piece) {
    return row * kF16RowBytes + ((piece ^ (row & 7)) << 4);
}

// Issues the copies of columns [k0, k0 + 128) of rows [first, first + ROWS) of `src` ([count, K]
// fp16, slot order) into a swizzled tile; rows past `count` and columns past K are zero-filled.
// Thread t copies piece t % 16 of rows t / 16 + 16i.
template <int ROWS>
__device__ __forceinline__ void stage_f16_tile(uint8_t* tile, const __half* src, int first, int count, int K,
                                               int k0) {
    const int piece = threadIdx.x & 15, col = k0 + 8 * piece;
#pragma unroll
    for (int i = 0; i < ROWS / 16; ++i) {
        const int row = (threadIdx.x >> 4) + 16 * i;
        const bool real = first + row < count && col < K;
        const __half* from = real ? src + static_cast<long long>(first + row) * K + col : src;
        copy16(tile + swizzled(row, piece), from, real ? 16 : 0);
    }
}

// acc[rb][j] += W rows row0 + 16rb .. x tokens 8j .. over sub-chunk `sub` (0..3) of a staged chunk:
// its two mmas in order, each from one ldmatrix.x4 per 16 rows and per 16 tokens.
template <typename S, int RB, int TG>
__device__ __forceinline__ void multiply_f16_sub_chunk(const uint8_t* stage, int row0, int sub, float acc[RB][TG][4]) {
    const int lane = threadIdx.x & 31;
    const uint8_t* w_tile = stage;
    const uint8_t* x_tile = stage + S::kWBytes;
#pragma unroll
    for (int m = 0; m < 2; ++m) {
        const int piece = 4 * sub + 2 * m;   // slots 16m .. 16m + 15 of the sub-chunk: two pieces
        // A (16 rows x 16 slots): lanes 0-15 address rows 0-15 at the first piece, 16-31 at the second.
        uint32_t a[RB][4];
#pragma unroll
        for (int rb = 0; rb < RB; ++rb)
            ldmatrix_x4(a[rb], w_tile + swizzled(row0 + 16 * rb + (lane & 15), piece + (lane >> 4)));
        // B (16 slots x 16 tokens, two 8-token groups): lanes 0-7 / 8-15 address tokens 0-7 at the
        // first / second piece, lanes 16-23 / 24-31 tokens 8-15.
#pragma unroll
        for (int jj = 0; jj < TG / 2; ++jj) {
            uint32_t b[4];
            const int token = 16 * jj + (lane & 7) + 8 * (lane >> 4);
            ldmatrix_x4(b, x_tile + swizzled(token, piece + ((lane >> 3) & 1)));
#pragma unroll
            for (int rb = 0; rb < RB; ++rb) {
                mma_16x8x16(acc[rb][2 * jj], a[rb], b[0], b[1]);
                mma_16x8x16(acc[rb][2 * jj + 1], a[rb], b[2], b[3]);
            }
        }
    }
}

template <int EPI, int RB, int TG>
__device__ void linear_f16_gemm(const LinearArgs& a, const __half* w16, const __half* x16) {
    using S = F16Tile<RB, TG>;
    extern __shared__ __align__(16) uint8_t smem[];
    const int n0 = blockIdx.x * S::kRows, m0 = blockIdx.y * S::kTokens;
    const int num_tokens = min(S::kTokens, a.num_tokens - m0);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, group = lane >> 2, quad = lane & 3;
    const int accumulator = warp % kAccumulators, row0 = S::kWarpRows * (warp / kAccumulators);
    float acc[RB][TG][4] = {};

    const int num_chunks = (a.num_cols + kF16ChunkCols - 1) / kF16ChunkCols;
    auto stage = [&](int c) { return smem + (c % kF16Stages) * S::kStageBytes; };
    // Every call commits a group (empty past the last chunk), so "at most kF16Stages - 2 groups
    // pending" always means chunk c has landed.
    auto issue = [&](int c) {
        if (c < num_chunks) {
            stage_f16_tile<S::kRows>(stage(c), w16, n0, a.num_rows, a.num_cols, c * kF16ChunkCols);
            stage_f16_tile<S::kTokens>(stage(c) + S::kWBytes, x16, m0, a.num_tokens, a.num_cols, c * kF16ChunkCols);
        }
        asm volatile("cp.async.commit_group;\n" ::: "memory");
    };
#pragma unroll
    for (int c = 0; c < kF16Stages - 1; ++c) issue(c);
    for (int c = 0; c < num_chunks; ++c) {
        asm volatile("cp.async.wait_group %0;\n" :: "n"(kF16Stages - 2) : "memory");
        // Chunk c is visible to every warp, and every warp is done with chunk c - 1, whose stage
        // the next issue overwrites.
        __syncthreads();
        issue(c + kF16Stages - 1);
        // Sub-chunks past K (a last chunk of 32, 64 or 96 columns) do not exist in the arithmetic.
        if (kSubK * accumulator < a.num_cols - c * kF16ChunkCols)
            multiply_f16_sub_chunk<S, RB, TG>(stage(c), row0, accumulator, acc);
    }
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();

    // totals[token][row] = ((a0 + a1) + a2) + a3: the warps of accumulator v add theirs in turn.
    float* totals = reinterpret_cast<float*>(smem);
    for (int v = 0; v < kAccumulators; ++v) {
        if (accumulator == v) {
#pragma unroll
            for (int rb = 0; rb < RB; ++rb)
#pragma unroll
                for (int j = 0; j < TG; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = row0 + 16 * rb + group + 8 * (e >> 1);
                        float& total = totals[(8 * j + 2 * quad + (e & 1)) * S::kTotalsStride + row];
                        total = v == 0 ? acc[rb][j][e] : __fadd_rn(total, acc[rb][j][e]);
                    }
        }
        __syncthreads();
    }
    auto total_of = [&](int row, int token) { return totals[token * S::kTotalsStride + row]; };
    write_tile<EPI, S::kRows, decltype(total_of), kF16Threads>(a, n0, m0, num_tokens, total_of);
}

}  // namespace linear_mma_detail

// y = fp16(x) in slot order: x [M, K] fp32, K % 32 == 0; one thread per 8 values (units = M * K / 8).
// Rounded as every layout rounds x (round to nearest even; beyond 65504 -> inf).
extern "C" __global__ void f32_to_f16_slots(const float* x, __half* y, int units) {
    const int u = blockIdx.x * blockDim.x + threadIdx.x;
    if (u >= units) return;
    const float4 lo = reinterpret_cast<const float4*>(x)[2 * u], hi = reinterpret_cast<const float4*>(x)[2 * u + 1];
    const float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    linear_mma_detail::write_slot_words(y + 32 * (u / 4), u % 4, v);
}

// dequant_slots_<type>: w16 = fp16(dequantized W) in slot order, W [num_rows, K] (K % 32 == 0),
// one thread per 8 values; the same dequant8_half2 values as the other layouts' fragments.
#define DEQUANT_SLOTS_ENTRY(TYPE, NAME)                                                               \
    extern "C" __global__ void dequant_slots_##NAME(const uint8_t* weight, int row_bytes, int num_rows,  \
                                                    int num_cols, __half* w16) {                       \
        const int units_per_row = num_cols / 8;                                                        \
        const int u = blockIdx.x * blockDim.x + threadIdx.x;                                           \
        if (u >= num_rows * units_per_row) return;                                                     \
        const int row = u / units_per_row, unit = u % units_per_row;                                   \
        uint32_t pairs[4];                                                                             \
        qformats::dequant8_half2<TYPE>(weight + static_cast<long long>(row) * row_bytes, 8 * unit, pairs); \
        linear_mma_detail::write_slot_pairs(w16 + 32LL * (u / 4), u % 4, pairs);                       \
    }
QFORMATS_FOR_EACH_TYPE(DEQUANT_SLOTS_ENTRY)

// linear_f16_gemm[32][_acc|_swiglu]_g<TG>: y (through the epilogue) = x16 @ w16.T with w16
// [num_rows, K] and x16 [num_tokens, K] fp16 in slot order; 64 (gemm) or 32 (gemm32) W rows x 8 * TG
// tokens per CTA, grid (ceil(num_rows / rows), ceil(num_tokens / (8 * TG))), 256 threads,
// F16Tile::kSharedBytes of dynamic shared memory (96 KB at most). SwiGLU: y16 (or null) also gets y
// as fp16 in slot order, rows y16_stride halves apart (the down projection's operand).
// PyCUDA prepared-call format "PPPiiiiPi".
#define LINEAR_F16_GEMM_ENTRY(NAME, EPI, RB, TG)                                                          \
    extern "C" __global__ void __launch_bounds__(linear_mma_detail::kF16Threads, 2)                      \
    NAME##_g##TG(const __half* w16, const __half* x16, float* y, int num_rows, int num_cols,              \
                 int num_tokens, int y_stride, __half* y16, int y16_stride) {                             \
        const linear_mma_detail::LinearArgs args{nullptr, 0, num_rows, num_cols, 0, 0, 0, nullptr, y,     \
                                                 num_tokens, y_stride, nullptr, 0.0f, y16, y16_stride};   \
        linear_mma_detail::linear_f16_gemm<EPI, RB, TG>(args, w16, x16);                                  \
    }
#define LINEAR_F16_GEMM_EPILOGUES(NAME, RB, TG)                                               \
    LINEAR_F16_GEMM_ENTRY(NAME, linear_mma_detail::kStore, RB, TG)                            \
    LINEAR_F16_GEMM_ENTRY(NAME##_acc, linear_mma_detail::kAccumulate, RB, TG)                 \
    LINEAR_F16_GEMM_ENTRY(NAME##_swiglu, linear_mma_detail::kSwiGLU, RB, TG)
LINEAR_F16_GEMM_EPILOGUES(linear_f16_gemm, 2, 8)
LINEAR_F16_GEMM_EPILOGUES(linear_f16_gemm32, 1, 8)
LINEAR_F16_GEMM_EPILOGUES(linear_f16_gemm32, 1, 4)
