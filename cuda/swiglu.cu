// SwiGLU: out = silu(gate) * up, silu(g) = g / (1 + exp(-g)). Elementwise, so trivially batch
// invariant. gate_up may be two separate buffers (the FFN's gate and up mat-vec outputs).
#include "common.cuh"

// grid = ceil(num_tokens * width / 256), block = 256
extern "C" __global__ void __launch_bounds__(256)
swiglu_f32(const float* __restrict__ gate,  // [num_tokens, width]
           const float* __restrict__ up,    // [num_tokens, width]
           float* __restrict__ out,         // [num_tokens, width]
           long long count) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
}
