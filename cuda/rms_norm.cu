// Fused residual add + RMSNorm.
//   v = residual[row] + delta[row]            (delta may be null: v = residual[row])
//   residual[row] = v                          (only when write_residual)
//   out[r] = v / sqrt(mean(v^2) + eps) * weight,   row = row_ids ? row_ids[r] : r
//   out16[r] = fp16(out[r]) in slot order      (out16 may be null): the next linear layer's input
// One block per output row; the row sum uses block_sum (fixed order), so a row's result does not
// depend on how many rows the launch holds (batch invariance).
#include "common.cuh"
#include "pdl.cuh"

namespace qs {

template <int THREADS>
__device__ __forceinline__ void rms_norm_row(const float* __restrict__ delta, float* residual,
                                             const float* __restrict__ weight, float* __restrict__ out,
                                             __half* __restrict__ out16, const int* __restrict__ row_ids,
                                             int hidden, float eps, int write_residual) {
    __shared__ float scratch[32];
    const int out_row = blockIdx.x;
    const int in_row = row_ids ? row_ids[out_row] : out_row;
    float* res = residual + (size_t)in_row * hidden;
    const float* del = delta ? delta + (size_t)in_row * hidden : nullptr;
    float sum_sq = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        const float v = del ? res[i] + del[i] : res[i];
        sum_sq = fmaf(v, v, sum_sq);
    }
    const float total = block_sum(sum_sq, scratch);
    const float inv_rms = 1.0f / sqrtf(total / (float)hidden + eps);
    float* dst = out + (size_t)out_row * hidden;
    // Each thread rewrites only the elements it read itself: no cross-thread hazard on `res`.
    for (int i = threadIdx.x; i < hidden; i += THREADS) {
        const float v = del ? res[i] + del[i] : res[i];
        if (write_residual) res[i] = v;
        const float y = v * inv_rms * weight[i];
        dst[i] = y;
        if (out16) out16[(size_t)out_row * hidden + slot_position(i)] = __float2half_rn(y);
    }
}

}  // namespace qs

// grid = (num_out_rows), block = (128)
extern "C" __global__ void __launch_bounds__(128)
rms_norm_f32(const float* delta,    // [num_rows, hidden] or null
             float* residual,       // [num_rows, hidden]
             const float* weight,   // [hidden]
             float* out,            // [num_out_rows, hidden]
             __half* out16,         // [num_out_rows, hidden] fp16 in slot order, or null
             const int* row_ids,    // [num_out_rows] or null
             int hidden, float eps, int write_residual) {
    qs::pdl_wait_for_previous_kernel();
    qs::rms_norm_row<128>(delta, residual, weight, out, out16, row_ids, hidden, eps, write_residual);
    qs::pdl_allow_next_kernel();
}
