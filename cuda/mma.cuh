// The tensor-core instructions the kernels share (linear layouts and attention): mma.sync
// m16n8k16 with fp16 operands and fp32 accumulators, ldmatrix loads of its fragments from shared
// memory, and the fp16 pair packing of its operands.
//
// Fragments of m16n8k16 (g = lane / 4, t = lane % 4): A (16 x 16, row-major) a0 = row g, columns
// 2t, 2t + 1; a1 = row g + 8, same columns; a2 / a3 = rows g / g + 8, columns 2t + 8, 2t + 9.
// B (16 x 8, column-major) b0 = rows 2t, 2t + 1 of column g; b1 = rows 2t + 8, 2t + 9. C / D:
// c0, c1 = row g, columns 2t, 2t + 1; c2, c3 = row g + 8. Each output element depends on its own
// row of A and column of B only.
#pragma once
#include <cuda_fp16.h>
#include <stdint.h>

namespace qs {

__device__ __forceinline__ uint32_t pack_half2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);   // lo -> low 16 bits = the lower k slot
    return *reinterpret_cast<const uint32_t*>(&h);
}

// acc += A (16 x 16, row-major fragments) * B (16 x 8, column fragments), fp32 accumulators.
__device__ __forceinline__ void mma_16x8x16(float acc[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8 x 8 fp16 matrices from shared memory: lane l gives the address of row l % 8 of matrix
// l / 8 (16 bytes); r[i] receives matrix i's elements (row l / 4, columns 2 (l % 4), + 1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

// The same, each matrix transposed: r[i] receives (rows 2 (l % 4), + 1; column l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}

}  // namespace qs
