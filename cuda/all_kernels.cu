// The single translation unit of the fatbin (`make kernels` -> cuda/build/qwen_kernels.fatbin):
// every op file is included here so PyCUDA loads one module with every extern "C" entry point.
#include "rms_norm.cu"
#include "rope_kv.cu"
#include "attention.cu"
#include "swiglu.cu"
#include "sampling.cu"
#include "embedding.cu"
#include "matvec.cu"
#include "linear_mma.cu"
#include "linear_mma_gemm.cu"
#include "linear_f16_gemm.cu"
