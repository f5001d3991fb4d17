// Quantized matrix-vector products for decode: y[b, n] = sum_k x[b, k] * W[n, k].
//
// W: [N, K] in any GGUF format (quant_formats.cuh), x: [B, K] fp32, y: [B, N] fp32.
// One CTA takes `rows_per_cta` consecutive rows: their bytes are one contiguous range, which is
// copied global -> shared with 16-byte cp.async (fully coalesced whatever the block size; the
// bytes of a 22-byte Q5_0 block are not 16-byte aligned, so direct vector loads cannot work).
// Then warp w computes rows w, w + num_warps, ... of the tile: lane l takes the 8-value units
// l, l + 32, ... of the row, dequantizes each unit once and applies it to every batch row.
//
// Fusions (both optional, same numerics per row whatever B): an RMSNorm of x before the product
// (norm_weight != nullptr: x_b * (1 / sqrt(mean(x_b^2) + eps)) * g, the sum of squares in a fixed
// order) and an epilogue: store y, accumulate into y (residual stream: y += W x), or SwiGLU over
// interleaved rows (W rows [gate_0, up_0, gate_1, up_1, ...] -> y[b, i] = silu(gate_i) * up_i, so
// y is [B, N / 2]).
//
// Batch invariance: a row's result depends only on (K, type). The per-lane order over units and
// the xor-butterfly over lanes are fixed; each batch row b runs the same explicit __fmaf_rn
// chain whatever B, MAX_B, b, the tiling or the split of the batch chunks over grid.y.
#include "quant_formats.cuh"

namespace matvec_detail {

constexpr int kUnit = 8;
constexpr int kRowsPerWarp = 4;
enum Epilogue : int { kStore = 0, kAccumulate = 1, kSwiGLU = 2 };

// Kernel parameters, gathered once so device functions take one argument.
struct MatvecArgs {
    const uint8_t* weight;   // [N, row_bytes]; the tile copy never reads past row N - 1
    int row_bytes;
    int num_rows;            // N
    int num_cols;            // K (a multiple of 8)
    int rows_per_cta;
    const float* x;          // [B, K]
    float* y;                // [B, N]
    int batch;               // B in all; CTA y takes chunks of MAX_B rows strided by gridDim.y
    const float* norm_weight;  // [K] RMSNorm gain applied to x first, or nullptr for none
    float norm_eps;
};

// Copies bytes [begin, end) of the weight into smem (which holds them from offset begin % 16).
__device__ __forceinline__ void stage_tile(const uint8_t* weight, long long begin, long long end,
                                           uint8_t* smem) {
    const long long first = begin & ~15LL;
    const int num_chunks = int((end - first + 15) / 16);
    for (int c = threadIdx.x; c < num_chunks; c += blockDim.x) {
        const long long src_offset = first + 16LL * c;
        const long long left = end - src_offset;
        const int src_size = left >= 16 ? 16 : int(left);   // zero-fill the tail chunk
        const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem + 16 * c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                     :: "r"(dst), "l"(weight + src_offset), "r"(src_size));
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
    __syncthreads();
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Warp-level dot products of `num_rows` (<= kRowsPerWarp) consecutive staged rows with MAX_B x rows.
// Each lane loads its x unit once per batch row and applies it to all the warp's rows, so x traffic
// per weight byte falls with the rows per warp. acc[r][b] runs the same __fmaf_rn chain (units
// lane, lane + 32, ... in order, then the butterfly) whatever num_rows, MAX_B or num_b.
__device__ __forceinline__ const float4* x_unit(const MatvecArgs& a, int b, int u) {
    return reinterpret_cast<const float4*>(a.x + static_cast<long long>(b) * a.num_cols + u * kUnit);
}

// 1 / sqrt(mean(x_b^2) + eps) per batch row, summed in the lane-strided unit order + butterfly.
template <int MAX_B>
__device__ void rms_scales(const MatvecArgs& a, int batch0, int num_b, float scale[MAX_B]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
        float sum = 0.0f;
        const int row = batch0 + (b < num_b ? b : 0);
        for (int u = lane; u < a.num_cols / kUnit; u += 32) {
            const float4 v0 = __ldg(x_unit(a, row, u)), v1 = __ldg(x_unit(a, row, u) + 1);
            sum = __fmaf_rn(v0.x, v0.x, sum); sum = __fmaf_rn(v0.y, v0.y, sum);
            sum = __fmaf_rn(v0.z, v0.z, sum); sum = __fmaf_rn(v0.w, v0.w, sum);
            sum = __fmaf_rn(v1.x, v1.x, sum); sum = __fmaf_rn(v1.y, v1.y, sum);
            sum = __fmaf_rn(v1.z, v1.z, sum); sum = __fmaf_rn(v1.w, v1.w, sum);
        }
        const float mean = __fdiv_rn(warp_sum(sum), float(a.num_cols));
        scale[b] = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, a.norm_eps)));
    }
}

__device__ __forceinline__ float4 scaled(float4 v, float s, float4 g) {
    return make_float4(__fmul_rn(__fmul_rn(v.x, s), g.x), __fmul_rn(__fmul_rn(v.y, s), g.y),
                       __fmul_rn(__fmul_rn(v.z, s), g.z), __fmul_rn(__fmul_rn(v.w, s), g.w));
}

// x[batch0 + b, 8u : 8u + 8] for every b (rows past num_b repeat row batch0: loaded, never
// stored), RMS-normalized when the kernel has a norm weight.
template <int MAX_B>
__device__ __forceinline__ void load_x_unit(const MatvecArgs& a, int batch0, int num_b, int u,
                                            const float scale[MAX_B], float4 x[MAX_B][2]) {
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
        const float4* xp = x_unit(a, batch0 + (b < num_b ? b : 0), u);
        x[b][0] = __ldg(xp);
        x[b][1] = __ldg(xp + 1);
    }
    if (a.norm_weight == nullptr) return;
    const float4* gp = reinterpret_cast<const float4*>(a.norm_weight + u * kUnit);
    const float4 g0 = __ldg(gp), g1 = __ldg(gp + 1);
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
        x[b][0] = scaled(x[b][0], scale[b], g0);
        x[b][1] = scaled(x[b][1], scale[b], g1);
    }
}

template <int EPI>
__device__ __forceinline__ void write_rows(const MatvecArgs& a, long long b, int n, float total,
                                           float next_total) {
    if (EPI == kStore) {
        a.y[b * a.num_rows + n] = total;
    } else if (EPI == kAccumulate) {
        a.y[b * a.num_rows + n] = __fadd_rn(a.y[b * a.num_rows + n], total);
    } else if ((n & 1) == 0) {   // SwiGLU: row n is gate_i, row n + 1 is up_i, i = n / 2
        const float silu = __fdiv_rn(total, __fadd_rn(1.0f, expf(-total)));
        a.y[b * (a.num_rows / 2) + n / 2] = __fmul_rn(silu, next_total);
    }
}

// Warp-level dot products of `num_rows` (<= kRowsPerWarp) consecutive staged rows with MAX_B x rows.
// Each lane loads its x unit once per batch row and applies it to all the warp's rows, so x traffic
// per weight byte falls with the rows per warp. acc[r][b] runs the same __fmaf_rn chain (units
// lane, lane + 32, ... in order, then the butterfly) whatever num_rows, MAX_B or num_b.
template <int T, int MAX_B, int EPI>
__device__ void warp_rows_dot(const uint8_t* rows, int num_rows, const MatvecArgs& a, int batch0,
                              int num_b, int n0) {
    const int lane = threadIdx.x & 31;
    float scale[MAX_B];
    if (a.norm_weight != nullptr) rms_scales<MAX_B>(a, batch0, num_b, scale);
    float acc[kRowsPerWarp][MAX_B];
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r)
#pragma unroll
        for (int b = 0; b < MAX_B; ++b) acc[r][b] = 0.0f;
    for (int u = lane; u < a.num_cols / kUnit; u += 32) {
        float4 x[MAX_B][2];
        load_x_unit<MAX_B>(a, batch0, num_b, u, scale, x);
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) {
            if (r >= num_rows) break;
            float w[kUnit];
            qformats::dequant8<T>(rows + r * a.row_bytes, u * kUnit, w);
#pragma unroll
            for (int b = 0; b < MAX_B; ++b) {
                float s = acc[r][b];
                s = __fmaf_rn(w[0], x[b][0].x, s); s = __fmaf_rn(w[1], x[b][0].y, s);
                s = __fmaf_rn(w[2], x[b][0].z, s); s = __fmaf_rn(w[3], x[b][0].w, s);
                s = __fmaf_rn(w[4], x[b][1].x, s); s = __fmaf_rn(w[5], x[b][1].y, s);
                s = __fmaf_rn(w[6], x[b][1].z, s); s = __fmaf_rn(w[7], x[b][1].w, s);
                acc[r][b] = s;
            }
        }
    }
#pragma unroll
    for (int b = 0; b < MAX_B; ++b) {
        float totals[kRowsPerWarp + 1];
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r) totals[r] = warp_sum(acc[r][b]);
        totals[kRowsPerWarp] = 0.0f;
#pragma unroll
        for (int r = 0; r < kRowsPerWarp; ++r)
            if (lane == 0 && r < num_rows && b < num_b)
                write_rows<EPI>(a, batch0 + b, n0 + r, totals[r], totals[r + 1]);
    }
}

// Warp w of the CTA owns tile rows [w * rows_per_warp, +rows_per_warp); the launcher keeps
// rows_per_warp <= kRowsPerWarp.
template <int T, int MAX_B, int EPI>
__device__ void matvec(const MatvecArgs& a) {
    extern __shared__ __align__(16) uint8_t tile[];
    const int row0 = blockIdx.x * a.rows_per_cta;
    const int num_tile_rows = min(a.rows_per_cta, a.num_rows - row0);
    const long long begin = static_cast<long long>(row0) * a.row_bytes;
    stage_tile(a.weight, begin, begin + static_cast<long long>(num_tile_rows) * a.row_bytes, tile);

    const int num_warps = blockDim.x / 32;
    const int rows_per_warp = (a.rows_per_cta + num_warps - 1) / num_warps;
    const int first = (threadIdx.x / 32) * rows_per_warp;
    const int count = min(rows_per_warp, num_tile_rows - first);
    if (count <= 0) return;
    // The staged tile serves every batch chunk of this CTA: the weight leaves DRAM once per
    // grid.y slice however large B is.
    for (int batch0 = blockIdx.y * MAX_B; batch0 < a.batch; batch0 += gridDim.y * MAX_B) {
        warp_rows_dot<T, MAX_B, EPI>(tile + (begin & 15) + first * a.row_bytes, count, a, batch0,
                                min(MAX_B, a.batch - batch0), row0 + first);
    }
}

}  // namespace matvec_detail

// Plain scalar parameters (PyCUDA prepared-call format "PiiiiPPiPf"); names
// matvec_<type>_b<MAX_B>, matvec_acc_<type>_b<MAX_B>, matvec_swiglu_<type>_b<MAX_B>.
#define QFORMATS_MATVEC_ENTRY(TYPE, NAME, MAX_B, PREFIX, EPI)                                    \
    extern "C" __global__ void __launch_bounds__(128) PREFIX##NAME##_b##MAX_B(                   \
        const uint8_t* weight, int row_bytes, int num_rows, int num_cols, int rows_per_cta,      \
        const float* x, float* y, int batch, const float* norm_weight, float norm_eps) {         \
        const matvec_detail::MatvecArgs args{weight, row_bytes, num_rows, num_cols,              \
                                             rows_per_cta, x, y, batch, norm_weight, norm_eps};  \
        matvec_detail::matvec<TYPE, MAX_B, EPI>(args);                                           \
    }
#define QFORMATS_MATVEC_BATCHES(TYPE, NAME, PREFIX, EPI)  \
    QFORMATS_MATVEC_ENTRY(TYPE, NAME, 1, PREFIX, EPI)     \
    QFORMATS_MATVEC_ENTRY(TYPE, NAME, 4, PREFIX, EPI)     \
    QFORMATS_MATVEC_ENTRY(TYPE, NAME, 8, PREFIX, EPI)
#define QFORMATS_MATVEC_ENTRIES(TYPE, NAME)                                        \
    QFORMATS_MATVEC_BATCHES(TYPE, NAME, matvec_, matvec_detail::kStore)            \
    QFORMATS_MATVEC_BATCHES(TYPE, NAME, matvec_acc_, matvec_detail::kAccumulate)   \
    QFORMATS_MATVEC_BATCHES(TYPE, NAME, matvec_swiglu_, matvec_detail::kSwiGLU)

QFORMATS_FOR_EACH_TYPE(QFORMATS_MATVEC_ENTRIES)
