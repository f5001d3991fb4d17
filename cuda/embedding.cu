// Embedding gather for every GGUF format: out[t, :] = dequantize(table[ids[t], :]) as fp32.
//
// table: [vocab, K] (row_bytes per row), ids: [T] int32, out: [T, K] fp32 (K a multiple of 8).
// One CTA per token; thread i writes the 8-value units i, i + blockDim.x, ... with two 16-byte
// stores each. Only a few rows are read per step, so the bytes are read straight from global
// memory (L1-cached) without staging. An id outside [0, vocab) yields a row of NaN, so a bad id
// upstream shows up in the logits instead of reading out of bounds.
#include "pdl.cuh"
#include "quant_formats.cuh"

namespace embedding_detail {

template <int T>
__device__ void gather(const uint8_t* table, int row_bytes, int vocab, int num_cols,
                       const int* ids, float* out) {
    const int token = blockIdx.x;
    const int id = ids[token];
    float4* dst = reinterpret_cast<float4*>(out + static_cast<long long>(token) * num_cols);
    const int num_units = num_cols / 8;
    if (id < 0 || id >= vocab) {
        const float nan = __int_as_float(0x7fc00000);
        for (int u = threadIdx.x; u < num_units; u += blockDim.x) {
            dst[2 * u] = make_float4(nan, nan, nan, nan);
            dst[2 * u + 1] = make_float4(nan, nan, nan, nan);
        }
        return;
    }
    const uint8_t* row = table + static_cast<long long>(id) * row_bytes;
    for (int u = threadIdx.x; u < num_units; u += blockDim.x) {
        float v[8];
        qformats::dequant8<T>(row, 8 * u, v);
        dst[2 * u] = make_float4(v[0], v[1], v[2], v[3]);
        dst[2 * u + 1] = make_float4(v[4], v[5], v[6], v[7]);
    }
}

}  // namespace embedding_detail

// PyCUDA prepared-call format "PiiiPP"; grid = (num_tokens,).
#define QFORMATS_EMBEDDING_ENTRY(TYPE, NAME)                                                   \
    extern "C" __global__ void __launch_bounds__(256) embedding_##NAME(                        \
        const uint8_t* table, int row_bytes, int vocab, int num_cols, const int* ids,          \
        float* out) {                                                                          \
        qs::pdl_wait_for_previous_kernel();   /* ids come from the sampler or the host */       \
        embedding_detail::gather<TYPE>(table, row_bytes, vocab, num_cols, ids, out);           \
        qs::pdl_allow_next_kernel();                                                           \
    }

QFORMATS_FOR_EACH_TYPE(QFORMATS_EMBEDDING_ENTRY)
