// Q/K/V bias + NeoX RoPE + paged KV-cache write, one block per token.
//   q_out[t] = rope(q_in[t] + bias_q, pos[t])   fp32 [num_tokens, num_heads * head_dim]
//   k        = rope(k_in[t] + bias_k, pos[t])   -> k_cache[slot[t]] as fp16
//   v        = v_in[t] + bias_v                 -> v_cache[slot[t]] as fp16
// The inputs are rows of any stride: the columns of one [tokens, q + k + v] buffer that the
// merged q/k/v launches write, or three buffers of their own. q_out may be q_in (in place).
// NeoX rotation pairs (i, i + head_dim/2) with angle pos * base^(-2i/head_dim); the angles come
// from host-computed cos/sin tables [max_positions, head_dim/2] so the device and the numpy
// reference use the same rounded values. KV cache layout (docs/ARCHITECTURE.md):
// [num_blocks * block_size (= slot), num_kv_heads, head_dim] fp16. slot < 0 means "do not write"
// (padding rows of a captured decode graph). Decode steps do all of this inside attention.cu
// instead (the same qs::rope_pair arithmetic), with no launch of their own.
#include "common.cuh"

// Every field 8 bytes wide so the host can mirror the layout with a plain numpy record.
struct RopeKvParams {
    const float* q_in;        // [num_tokens, q_in_stride]: num_heads * head_dim values per row
    float* q_out;             // [num_tokens, num_heads * head_dim]
    const float* k_in;        // [num_tokens, kv_in_stride]: num_kv_heads * head_dim values per row
    const float* v_in;        // [num_tokens, kv_in_stride]
    const float* bias_q;      // [num_heads * head_dim]
    const float* bias_k;      // [num_kv_heads * head_dim]
    const float* bias_v;      // [num_kv_heads * head_dim]
    const int* positions;     // [num_tokens]
    const int* slot_mapping;  // [num_tokens]
    const float* cos_table;   // [max_positions, head_dim / 2]
    const float* sin_table;   // [max_positions, head_dim / 2]
    __half* k_cache;          // [num_slots, num_kv_heads, head_dim]
    __half* v_cache;          // [num_slots, num_kv_heads, head_dim]
    long long num_heads;
    long long num_kv_heads;
    long long head_dim;
    long long q_in_stride;    // floats from one token's q_in row to the next
    long long kv_in_stride;   // the same for k_in and v_in
};

// grid = (num_tokens), block = (256)
extern "C" __global__ void __launch_bounds__(256) rope_kv_f32(const RopeKvParams p) {
    const int t = blockIdx.x;
    const int hd = (int)p.head_dim, half_dim = hd / 2;
    const int nh = (int)p.num_heads, nkv = (int)p.num_kv_heads;
    const int pos = p.positions[t];
    const int slot = p.slot_mapping[t];
    const float* cos_row = p.cos_table + (size_t)pos * half_dim;
    const float* sin_row = p.sin_table + (size_t)pos * half_dim;
    const float* q_in = p.q_in + (size_t)t * p.q_in_stride;
    float* q_out = p.q_out + (size_t)t * nh * hd;
    const float* k = p.k_in + (size_t)t * p.kv_in_stride;
    const float* v = p.v_in + (size_t)t * p.kv_in_stride;
    const int num_q_pairs = nh * half_dim, num_k_pairs = nkv * half_dim;
    for (int w = threadIdx.x; w < num_q_pairs; w += blockDim.x) {
        const int head = w / half_dim, i = w % half_dim;
        float x0, x1;
        qs::rope_pair(q_in, p.bias_q, head * hd, i, half_dim, cos_row[i], sin_row[i], &x0, &x1);
        q_out[head * hd + i] = x0;  // this thread alone reads and writes this pair (q_out may be q_in)
        q_out[head * hd + i + half_dim] = x1;
    }
    if (slot < 0) return;
    __half* k_dst = p.k_cache + (size_t)slot * nkv * hd;
    __half* v_dst = p.v_cache + (size_t)slot * nkv * hd;
    for (int w = threadIdx.x; w < num_k_pairs; w += blockDim.x) {
        const int head = w / half_dim, i = w % half_dim;
        float x0, x1;
        qs::rope_pair(k, p.bias_k, head * hd, i, half_dim, cos_row[i], sin_row[i], &x0, &x1);
        k_dst[head * hd + i] = __float2half_rn(x0);
        k_dst[head * hd + i + half_dim] = __float2half_rn(x1);
    }
    for (int w = threadIdx.x; w < nkv * hd; w += blockDim.x) {
        v_dst[w] = qs::biased_v_half(v, p.bias_v, w);
    }
}
