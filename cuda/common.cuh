// Shared helpers for the qwen-serve kernels: warp reductions in a fixed order and fp16 loads.
//
// Batch invariance: every reduction here combines values in an order fixed by lane / thread
// index only (xor butterfly, then a fixed tree over warps), never by how many rows or tokens a
// launch holds, and never through atomics.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

#define QS_WARP 32

namespace qs {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). `scratch` holds >= 32
// floats. Every thread gets the result. Order: butterfly within each warp, then warp 0 sums the
// per-warp partials by butterfly (missing warps contribute 0): fixed for a given blockDim.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // scratch may still be read by a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = lane < num_warps ? scratch[lane] : 0.0f;
    total = warp_sum(total);
    return total;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float best = lane < num_warps ? scratch[lane] : -INFINITY;
    return warp_max(best);
}

// 8 consecutive fp16 values (one 16-byte load) widened to fp32.
__device__ __forceinline__ void load_half8(const __half* src, float* dst) {
    const uint4 raw = *reinterpret_cast<const uint4*>(src);
    const __half2* h2 = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 f = __half22float2(h2[i]);
        dst[2 * i] = f.x;
        dst[2 * i + 1] = f.y;
    }
}

// Bias + NeoX RoPE of pair i of one head (elements i and i + half of the head starting at
// `base`): (a, b) = (src + bias) at both, x0 = a c - b s, x1 = b c + a s. Every operation rounded
// on its own (no contraction into FMAs), so that rope_kv.cu and attention.cu's decode path, which
// both call this, give the same bits (and the numpy reference's float32 formula).
__device__ __forceinline__ void rope_pair(const float* src, const float* bias, int base, int i, int half,
                                          float c, float s, float* x0, float* x1) {
    const float a = __fadd_rn(src[base + i], bias[base + i]);
    const float b = __fadd_rn(src[base + i + half], bias[base + i + half]);
    *x0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *x1 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

// V element i + its bias, rounded to the fp16 the cache holds: with rope_pair, the values rope_kv.cu
// and attention.cu's decode path both write, so that they write the same bits.
__device__ __forceinline__ __half biased_v_half(const float* src, const float* bias, int i) {
    return __float2half_rn(__fadd_rn(src[i], bias[i]));
}

// 16 bytes global -> shared through cp.async (no registers); the caller commits and waits.
__device__ __forceinline__ void cp_async16(void* dst_shared, const void* src) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst_shared));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" :: "r"(d), "l"(src) : "memory");
}

// "Slot order" (linear_f16_gemm.cu): where column `col` of a row goes in the fp16 copy that the
// f16gemm layout multiplies. Within each 32-column sub-chunk, the column pair 8q + 2i, 8q + 2i + 1
// (q, i = 0..3) is 32-bit word 4i + q. Producers of a linear layer's input (rms_norm, attention,
// the SwiGLU epilogue) write that copy beside their fp32 output, so no conversion pass runs.
__device__ __forceinline__ int slot_position(int col) {
    const int in_sub = col & 31, pair = in_sub >> 1;
    return (col & ~31) + 2 * (4 * (pair & 3) + (pair >> 2)) + (col & 1);
}

}  // namespace qs
