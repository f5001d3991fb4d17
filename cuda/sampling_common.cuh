// Pieces of the GPU sampler (sampling.cu): per-sequence arguments, Philox-4x32-10, candidate keys
// and fixed-order block reductions in float64. The specification is gpu_worker/sampling/sampler.py.
#pragma once
#include "common.cuh"

// One per sampled sequence; mirrored on the host by a numpy record with align=True.
struct SampleArgs {
    unsigned long long seed;
    unsigned long long step;
    int row;               // row of the logits buffer
    int top_k;             // 0 = off
    double top_p;          // 1 = off (float64: the spec compares in float64 against the Python value)
    double min_p;          // 0 = off
    float temperature;     // 0 = greedy
    float repetition_penalty;  // 1 = off
    float frequency_penalty;   // 0 = off
    float presence_penalty;    // 0 = off
    int bias_offset, bias_count;      // into bias_ids / bias_values (in the request's order)
    int seen_offset, seen_count;      // into seen_ids (distinct prompt + output ids)
    int output_offset, output_count;  // into output_ids / output_counts (distinct generated ids)
    int num_top_logprobs;
    int want_logprobs;
};

namespace qs {

__device__ __forceinline__ unsigned mulhilo(unsigned a, unsigned b, unsigned* lo) {
    const unsigned long long product = (unsigned long long)a * b;
    *lo = (unsigned)product;
    return (unsigned)(product >> 32);
}

// philox.uniform(seed, step): key = seed (lo, hi), counter = (step lo, step hi, 0, 0); word 0.
__device__ __forceinline__ float philox_uniform(unsigned long long seed, unsigned long long step) {
    unsigned c0 = (unsigned)step, c1 = (unsigned)(step >> 32), c2 = 0u, c3 = 0u;
    unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
    for (int round = 0; round < 10; ++round) {
        if (round) { k0 += 0x9E3779B9u; k1 += 0xBB67AE85u; }
        unsigned lo0, lo1;
        const unsigned hi0 = mulhilo(0xD2511F53u, c0, &lo0);
        const unsigned hi1 = mulhilo(0xCD9E8D57u, c2, &lo1);
        const unsigned n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    }
    return (float)(c0 >> 8) * 0x1p-24f;
}

// Candidate order of the spec (value descending, then id ascending) as one ascending uint64:
// high word = bit-flipped order-preserving image of the float, low word = id.
__device__ __forceinline__ unsigned long long candidate_key(float x, int id) {
    const unsigned bits = __float_as_uint(x);
    const unsigned ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);  // ascending in x
    return ((unsigned long long)(~ordered) << 32) | (unsigned)id;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Block-wide float64 sum, fixed order (see block_sum). scratch: >= 32 doubles.
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum_f64(lane < num_warps ? scratch[lane] : 0.0);
}

__device__ __forceinline__ unsigned long long block_min_u64(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, num_warps = blockDim.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other < v ? other : v;
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < num_warps ? scratch[lane] : ~0ull;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const unsigned long long other = __shfl_xor_sync(0xffffffffu, v, offset);
        v = other < v ? other : v;
    }
    return v;
}

}  // namespace qs
