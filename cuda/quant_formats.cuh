// GGUF weight formats as device functions, shared by matvec.cu, embedding.cu and gemm.cu.
//
// Block layouts are byte-for-byte llama.cpp's (ggml-common.h); all multi-byte fields are
// little-endian and at even offsets, so a block pointer with 2-byte alignment suffices.
// A weight is row-major [rows, cols]; each row is a whole number of blocks, rows packed
// back to back (row r starts at byte r * row_bytes).
//
// The one entry point every kernel uses is
//     dequant8<TYPE>(row, v0, out)   -> out[0..8) = values v0 .. v0+7 of the row (v0 % 8 == 0)
// Eight consecutive values always share one scale (and min) in every format, so a kernel can
// treat every type as "units of 8 values" and stay type-generic. The arithmetic is spelled out
// with __fmul_rn/__fmaf_rn so that no caller's surrounding code can change its rounding.
#pragma once
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace qformats {

// GGML type ids (ggml.h enum ggml_type); the launchers pass these numbers to pick kernels.
enum GgmlType : int {
    kF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8,
    kQ4_K = 12, kQ5_K = 13, kQ6_K = 14, kBF16 = 30,
};

// Values and bytes per block, for index arithmetic.
template <int T> struct BlockInfo;
template <> struct BlockInfo<kF32>  { static constexpr int kValues = 1;   static constexpr int kBytes = 4; };
template <> struct BlockInfo<kF16>  { static constexpr int kValues = 1;   static constexpr int kBytes = 2; };
template <> struct BlockInfo<kBF16> { static constexpr int kValues = 1;   static constexpr int kBytes = 2; };
template <> struct BlockInfo<kQ4_0> { static constexpr int kValues = 32;  static constexpr int kBytes = 18; };
template <> struct BlockInfo<kQ4_1> { static constexpr int kValues = 32;  static constexpr int kBytes = 20; };
template <> struct BlockInfo<kQ5_0> { static constexpr int kValues = 32;  static constexpr int kBytes = 22; };
template <> struct BlockInfo<kQ5_1> { static constexpr int kValues = 32;  static constexpr int kBytes = 24; };
template <> struct BlockInfo<kQ8_0> { static constexpr int kValues = 32;  static constexpr int kBytes = 34; };
template <> struct BlockInfo<kQ4_K> { static constexpr int kValues = 256; static constexpr int kBytes = 144; };
template <> struct BlockInfo<kQ5_K> { static constexpr int kValues = 256; static constexpr int kBytes = 176; };
template <> struct BlockInfo<kQ6_K> { static constexpr int kValues = 256; static constexpr int kBytes = 210; };

__device__ __forceinline__ float load_half(const uint8_t* p) {
    return __half2float(*reinterpret_cast<const __half*>(p));
}

__device__ __forceinline__ uint32_t load_u32_unaligned(const uint8_t* p) {
    // qh fields sit at offsets 2 or 4 of 22/24-byte blocks: only 2-byte aligned.
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return uint32_t(h[0]) | (uint32_t(h[1]) << 16);
}

// Locates the block holding value v of a row and v's index inside that block.
template <int T>
__device__ __forceinline__ const uint8_t* block_of(const uint8_t* row, int v, int& index_in_block) {
    constexpr int kValues = BlockInfo<T>::kValues;
    index_in_block = v % kValues;
    return row + (v / kValues) * BlockInfo<T>::kBytes;
}

// Bytes p[0..8) with four 2-byte loads (every quant field sits at an even offset of an even-sized
// block, so 2-byte alignment always holds; half the load instructions of byte loads).
__device__ __forceinline__ void load8_bytes(const uint8_t* p, int out[8]) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const uint32_t pair = h[j];
        out[2 * j] = int(pair & 0xFFu);
        out[2 * j + 1] = int(pair >> 8);
    }
}

// 4-bit nibbles of a 32-value block: values 0..15 are low nibbles of qs[0..15], 16..31 high.
__device__ __forceinline__ void nibbles8(const uint8_t* qs, int i, int out[8]) {
    const int shift = i < 16 ? 0 : 4;
    load8_bytes(qs + (i & 15), out);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = (out[j] >> shift) & 0xF;
}

// Fifth bit of value i..i+7 from the 32-bit qh mask (bit i = value i).
__device__ __forceinline__ void high_bits8(uint32_t qh, int i, int out[8]) {
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] |= int((qh >> (i + j)) & 1u) << 4;
}

// The same 8 bytes as two little-endian words (four 2-byte loads: only 2-byte alignment holds).
__device__ __forceinline__ uint2 load8_words(const uint8_t* p) {
    const uint16_t* h = reinterpret_cast<const uint16_t*>(p);
    return make_uint2(uint32_t(h[0]) | (uint32_t(h[1]) << 16), uint32_t(h[2]) | (uint32_t(h[3]) << 16));
}

// Bits 0..3 of `bits` moved to bit 4 of bytes 0..3 (bit j -> bit 8j + 4): the fifth bits of four
// 5-bit values. t * 0x00204081 puts bit j at 8j (and at positions that are no multiple of 8).
__device__ __forceinline__ uint32_t spread4_to_bit4(uint32_t bits) {
    return ((bits & 0xFu) * 0x00204081u & 0x01010101u) << 4;
}

// Byte j of `word` (an integer 0..255) minus `bias`, as float, exactly and without an int->float
// conversion: 0x4B000000 | byte is the float 2^23 + byte, and subtracting 2^23 + bias is exact.
// Bitwise the value float(byte - bias) that the plain conversion gives.
template <int J>
__device__ __forceinline__ float byte_minus(uint32_t word, float magic_plus_bias) {
    return __fsub_rn(__int_as_float(__byte_perm(word, 0x4B000000u, 0x7440u | J)), magic_plus_bias);
}
constexpr float kMagic = 8388608.0f;   // 2^23

// dequant8_block<T>(b, i, out): values i..i+7 of the block at b (one value per "block" for the
// float types, i = 0). dequant8<T>(row, v0, out): values v0..v0+7 of a row, v0 a multiple of 8.
template <int T> __device__ void dequant8_block(const uint8_t* b, int i, float out[8]);

template <int T>
__device__ __forceinline__ void dequant8(const uint8_t* row, int v0, float out[8]) {
    int i; const uint8_t* b = block_of<T>(row, v0, i);
    dequant8_block<T>(b, i, out);
}

template <> __device__ __forceinline__ void dequant8_block<kF32>(const uint8_t* b, int, float out[8]) {
    const float* p = reinterpret_cast<const float*>(b);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = p[j];
}

template <> __device__ __forceinline__ void dequant8_block<kF16>(const uint8_t* b, int, float out[8]) {
    const __half* p = reinterpret_cast<const __half*>(b);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __half2float(p[j]);
}

template <> __device__ __forceinline__ void dequant8_block<kBF16>(const uint8_t* b, int, float out[8]) {
    const __nv_bfloat16* p = reinterpret_cast<const __nv_bfloat16*>(b);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __bfloat162float(p[j]);
}

// Q4_0: { half d; uint8 qs[16]; }  x = d * (q - 8)
template <> __device__ __forceinline__ void dequant8_block<kQ4_0>(const uint8_t* b, int i, float out[8]) {
    const float d = load_half(b);
    int q[8]; nibbles8(b + 2, i, q);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __fmul_rn(d, float(q[j] - 8));
}

// Q4_1: { half d; half m; uint8 qs[16]; }  x = d * q + m
template <> __device__ __forceinline__ void dequant8_block<kQ4_1>(const uint8_t* b, int i, float out[8]) {
    const float d = load_half(b), m = load_half(b + 2);
    int q[8]; nibbles8(b + 4, i, q);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __fmaf_rn(d, float(q[j]), m);
}

// Q5_0: { half d; uint8 qh[4]; uint8 qs[16]; }  x = d * (q - 16), q = nibble | qh bit << 4
// (four values per word: nibbles masked, fifth bits spread in, bytes read as floats by byte_minus).
template <> __device__ __forceinline__ void dequant8_block<kQ5_0>(const uint8_t* b, int i, float out[8]) {
    const float d = load_half(b);
    const uint2 w = load8_words(b + 6 + (i & 15));
    const int shift = i < 16 ? 0 : 4;
    const uint32_t qh = load_u32_unaligned(b + 2) >> i;   // bit j: fifth bit of value i + j
    const uint32_t lo = ((w.x >> shift) & 0x0F0F0F0Fu) | spread4_to_bit4(qh);
    const uint32_t hi = ((w.y >> shift) & 0x0F0F0F0Fu) | spread4_to_bit4(qh >> 4);
    out[0] = __fmul_rn(d, byte_minus<0>(lo, kMagic + 16.0f)); out[1] = __fmul_rn(d, byte_minus<1>(lo, kMagic + 16.0f));
    out[2] = __fmul_rn(d, byte_minus<2>(lo, kMagic + 16.0f)); out[3] = __fmul_rn(d, byte_minus<3>(lo, kMagic + 16.0f));
    out[4] = __fmul_rn(d, byte_minus<0>(hi, kMagic + 16.0f)); out[5] = __fmul_rn(d, byte_minus<1>(hi, kMagic + 16.0f));
    out[6] = __fmul_rn(d, byte_minus<2>(hi, kMagic + 16.0f)); out[7] = __fmul_rn(d, byte_minus<3>(hi, kMagic + 16.0f));
}

// Q5_1: { half d; half m; uint8 qh[4]; uint8 qs[16]; }  x = d * q + m
template <> __device__ __forceinline__ void dequant8_block<kQ5_1>(const uint8_t* b, int i, float out[8]) {
    const float d = load_half(b), m = load_half(b + 2);
    int q[8]; nibbles8(b + 8, i, q); high_bits8(load_u32_unaligned(b + 4), i, q);
#pragma unroll
    for (int j = 0; j < 8; ++j) out[j] = __fmaf_rn(d, float(q[j]), m);
}

// Q8_0: { half d; int8 qs[32]; }  x = d * q  (q + 128 = the byte with its top bit flipped)
template <> __device__ __forceinline__ void dequant8_block<kQ8_0>(const uint8_t* b, int i, float out[8]) {
    const float d = load_half(b);
    const uint2 w = load8_words(b + 2 + i);
    const uint32_t lo = w.x ^ 0x80808080u, hi = w.y ^ 0x80808080u;
    out[0] = __fmul_rn(d, byte_minus<0>(lo, kMagic + 128.0f)); out[1] = __fmul_rn(d, byte_minus<1>(lo, kMagic + 128.0f));
    out[2] = __fmul_rn(d, byte_minus<2>(lo, kMagic + 128.0f)); out[3] = __fmul_rn(d, byte_minus<3>(lo, kMagic + 128.0f));
    out[4] = __fmul_rn(d, byte_minus<0>(hi, kMagic + 128.0f)); out[5] = __fmul_rn(d, byte_minus<1>(hi, kMagic + 128.0f));
    out[6] = __fmul_rn(d, byte_minus<2>(hi, kMagic + 128.0f)); out[7] = __fmul_rn(d, byte_minus<3>(hi, kMagic + 128.0f));
}

// 6-bit scale and min of sub-block s (0..7) from the 12 packed bytes of Q4_K / Q5_K.
__device__ __forceinline__ void scale_min_k4(const uint8_t* sc, int s, int& scale, int& min) {
    if (s < 4) {
        scale = sc[s] & 63;
        min = sc[s + 4] & 63;
    } else {
        scale = (sc[s + 4] & 0xF) | ((sc[s - 4] >> 6) << 4);
        min = (sc[s + 4] >> 4) | ((sc[s] >> 6) << 4);
    }
}

// Q4_K: { half d; half dmin; uint8 scales[12]; uint8 qs[128]; }, 8 sub-blocks of 32 values.
// Sub-block s uses nibble (s & 1) of qs[32 * (s / 2) + l];  x = d*scale_s*q - dmin*min_s
template <> __device__ __forceinline__ void dequant8_block<kQ4_K>(const uint8_t* b, int i, float out[8]) {
    const int s = i / 32, l = i % 32;
    int scale, min; scale_min_k4(b + 4, s, scale, min);
    const float d = __fmul_rn(load_half(b), float(scale));
    const float m = __fmul_rn(load_half(b + 2), float(min));
    const uint2 w = load8_words(b + 16 + 32 * (s / 2) + l);
    const int shift = (s & 1) * 4;
    const uint32_t lo = (w.x >> shift) & 0x0F0F0F0Fu, hi = (w.y >> shift) & 0x0F0F0F0Fu;
    out[0] = __fmaf_rn(d, byte_minus<0>(lo, kMagic), -m); out[1] = __fmaf_rn(d, byte_minus<1>(lo, kMagic), -m);
    out[2] = __fmaf_rn(d, byte_minus<2>(lo, kMagic), -m); out[3] = __fmaf_rn(d, byte_minus<3>(lo, kMagic), -m);
    out[4] = __fmaf_rn(d, byte_minus<0>(hi, kMagic), -m); out[5] = __fmaf_rn(d, byte_minus<1>(hi, kMagic), -m);
    out[6] = __fmaf_rn(d, byte_minus<2>(hi, kMagic), -m); out[7] = __fmaf_rn(d, byte_minus<3>(hi, kMagic), -m);
}

// Q5_K: { half d; half dmin; uint8 scales[12]; uint8 qh[32]; uint8 qs[128]; }
// As Q4_K, plus fifth bit s of qh[l].
template <> __device__ __forceinline__ void dequant8_block<kQ5_K>(const uint8_t* b, int i, float out[8]) {
    const int s = i / 32, l = i % 32;
    int scale, min; scale_min_k4(b + 4, s, scale, min);
    const float d = __fmul_rn(load_half(b), float(scale));
    const float m = __fmul_rn(load_half(b + 2), float(min));
    int qh[8]; load8_bytes(b + 16 + l, qh);
    int q[8]; load8_bytes(b + 48 + 32 * (s / 2) + l, q);
    const int shift = (s & 1) * 4;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int v = ((q[j] >> shift) & 0xF) | (((qh[j] >> s) & 1) << 4);
        out[j] = __fmaf_rn(d, float(v), -m);
    }
}

// Q6_K: { uint8 ql[128]; uint8 qh[64]; int8 scales[16]; half d; }, two halves of 128 values.
// In half h, value g*32 + l (g = 0..3) takes nibble (g >= 2) of ql[64h + 32(g&1) + l] and bits
// 2g..2g+1 of qh[32h + l];  x = d * scales[i / 16] * (q - 32)
template <> __device__ __forceinline__ void dequant8_block<kQ6_K>(const uint8_t* b, int i, float out[8]) {
    const int h = i / 128, g = (i % 128) / 32, l = i % 32;
    const float d = __fmul_rn(load_half(b + 208), float(reinterpret_cast<const int8_t*>(b + 192)[i / 16]));
    const uint2 ql = load8_words(b + 64 * h + 32 * (g & 1) + l);
    const uint2 qh = load8_words(b + 128 + 32 * h + l);
    const int lo_shift = (g >= 2) ? 4 : 0, hi_shift = 2 * g;
    const uint32_t lo = ((ql.x >> lo_shift) & 0x0F0F0F0Fu) | (((qh.x >> hi_shift) & 0x03030303u) << 4);
    const uint32_t hi = ((ql.y >> lo_shift) & 0x0F0F0F0Fu) | (((qh.y >> hi_shift) & 0x03030303u) << 4);
    out[0] = __fmul_rn(d, byte_minus<0>(lo, kMagic + 32.0f)); out[1] = __fmul_rn(d, byte_minus<1>(lo, kMagic + 32.0f));
    out[2] = __fmul_rn(d, byte_minus<2>(lo, kMagic + 32.0f)); out[3] = __fmul_rn(d, byte_minus<3>(lo, kMagic + 32.0f));
    out[4] = __fmul_rn(d, byte_minus<0>(hi, kMagic + 32.0f)); out[5] = __fmul_rn(d, byte_minus<1>(hi, kMagic + 32.0f));
    out[6] = __fmul_rn(d, byte_minus<2>(hi, kMagic + 32.0f)); out[7] = __fmul_rn(d, byte_minus<3>(hi, kMagic + 32.0f));
}

// ---- dequant8 rounded to fp16: what the tensor-core kernels multiply ----------------------
//
//     dequant8_half2<TYPE>(row, v0, out)  -> out[k] = half2(fp16(value 2k), fp16(value 2k + 1))
//
// Bitwise fp16(dequant8(...)) for every type. Where a value is d * (q - bias) with d an fp16 scale
// and q a small integer (Q4_0, Q5_0, Q8_0), the product is formed in half precision directly:
// 0x6400 | q is the half 1024 + q, subtracting 1024 + bias is exact, and __hmul2 rounds the exact
// product d * (q - bias) once to fp16, as rounding dequant8's (exact) fp32 product to fp16 does,
// with half the instructions per value. Other types (fp32 scales such as K-quants' d * scale)
// convert dequant8's fp32 values.
template <int T>
__device__ __forceinline__ void dequant8_half2_block(const uint8_t* b, int i, uint32_t out[4]) {
    float v[8];
    dequant8_block<T>(b, i, v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const __half2 h = __floats2half2_rn(v[2 * k], v[2 * k + 1]);
        out[k] = *reinterpret_cast<const uint32_t*>(&h);
    }
}

// out[2w + k] = d * (q - bias) for the byte pairs (0, 1) and (2, 3) of words[w], each byte a q.
__device__ __forceinline__ void scale_byte_pairs(const uint8_t* d_ptr, const uint32_t words[2], float bias,
                                                 uint32_t out[4]) {
    const __half2 d = __half2half2(*reinterpret_cast<const __half*>(d_ptr));
    const __half2 offset = __float2half2_rn(1024.0f + bias);
#pragma unroll
    for (int w = 0; w < 2; ++w) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
            // bytes 2k, 2k + 1 of the word under 0x64 high bytes: halves 1024 + q
            const uint32_t magic = __byte_perm(words[w], 0x64646464u, k ? 0x4342u : 0x4140u);
            const __half2 q = __hsub2(*reinterpret_cast<const __half2*>(&magic), offset);
            const __half2 x = __hmul2(d, q);
            out[2 * w + k] = *reinterpret_cast<const uint32_t*>(&x);
        }
    }
}

template <> __device__ __forceinline__ void dequant8_half2_block<kQ4_0>(const uint8_t* b, int i, uint32_t out[4]) {
    const uint2 w = load8_words(b + 2 + (i & 15));
    const int shift = i < 16 ? 0 : 4;
    const uint32_t words[2] = {(w.x >> shift) & 0x0F0F0F0Fu, (w.y >> shift) & 0x0F0F0F0Fu};
    scale_byte_pairs(b, words, 8.0f, out);
}

template <> __device__ __forceinline__ void dequant8_half2_block<kQ5_0>(const uint8_t* b, int i, uint32_t out[4]) {
    const uint2 w = load8_words(b + 6 + (i & 15));
    const int shift = i < 16 ? 0 : 4;
    const uint32_t qh = load_u32_unaligned(b + 2) >> i;   // bit j: fifth bit of value i + j
    const uint32_t words[2] = {((w.x >> shift) & 0x0F0F0F0Fu) | spread4_to_bit4(qh),
                               ((w.y >> shift) & 0x0F0F0F0Fu) | spread4_to_bit4(qh >> 4)};
    scale_byte_pairs(b, words, 16.0f, out);
}

template <> __device__ __forceinline__ void dequant8_half2_block<kQ8_0>(const uint8_t* b, int i, uint32_t out[4]) {
    const uint2 w = load8_words(b + 2 + i);
    const uint32_t words[2] = {w.x ^ 0x80808080u, w.y ^ 0x80808080u};   // q + 128
    scale_byte_pairs(b, words, 128.0f, out);
}

// The same from a row and a value index v0 (a multiple of 8).
template <int T>
__device__ __forceinline__ void dequant8_half2(const uint8_t* row, int v0, uint32_t out[4]) {
    int i; const uint8_t* b = block_of<T>(row, v0, i);
    dequant8_half2_block<T>(b, i, out);
}

}  // namespace qformats

// Instantiates MACRO(type_id, lowercase_name) once per supported type; the kernels' extern "C"
// names are built from the lowercase name (matvec_q4_k_b8, embedding_q5_0, gemm_bf16, ...).
#define QFORMATS_FOR_EACH_TYPE(MACRO) \
    MACRO(qformats::kF32, f32)        \
    MACRO(qformats::kF16, f16)        \
    MACRO(qformats::kBF16, bf16)      \
    MACRO(qformats::kQ4_0, q4_0)      \
    MACRO(qformats::kQ4_1, q4_1)      \
    MACRO(qformats::kQ5_0, q5_0)      \
    MACRO(qformats::kQ5_1, q5_1)      \
    MACRO(qformats::kQ8_0, q8_0)      \
    MACRO(qformats::kQ4_K, q4_k)      \
    MACRO(qformats::kQ5_K, q5_k)      \
    MACRO(qformats::kQ6_K, q6_k)
