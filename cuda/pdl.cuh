// Programmatic dependent launch (PDL, sm_90+): a kernel's CTAs may be scheduled while the kernel before
// it finishes, so the launch latency between dependent kernels overlaps the previous kernel's tail.
//
// The launcher (gpu_worker/backends/cuda/launcher.py, pdl_aware) starts the kernels that follow
// these rules with the programmatic-stream-serialization attribute:
// - every thread calls pdl_wait_for_previous_kernel() before it reads anything an earlier kernel
//   wrote, before it writes anything, and before it returns: the kernel then completes after the one
//   before it, so "after the previous kernel" stays transitive down the stream;
// - pdl_allow_next_kernel() comes late, once a CTA's main work is done: the next kernel's CTAs are
//   scheduled when every CTA of this one has called it (or exited).
// A first version (b9654c2) called it at every kernel's start and fetched weights before the wait: a
// batch-1 decode step went 1.389 -> 1.587 ms. Fetching early still loses (linear_mma.cu, for_each_chunk).
// Without the attribute, or below sm_90, all of this does nothing.
#pragma once

namespace qs {

__device__ __forceinline__ void pdl_allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

}  // namespace qs
