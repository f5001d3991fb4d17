// Programmatic dependent launch (PDL, sm_90+): how a kernel overlaps the tail of the one before it.
//
// The launcher (gpu_worker/backends/cuda/launcher.py) starts every kernel with the
// programmatic-stream-serialization attribute: kernel N + 1 may be scheduled once every CTA of
// kernel N has called pdl_allow_next_kernel(), instead of after kernel N has drained. Its CTAs then
// run their prologue (a linear layer prefetches its weights, which no kernel writes) and block in
// pdl_wait_for_previous_kernel() until kernel N has completed and its writes are visible.
//
// The rule that keeps this exact: every kernel calls pdl_wait_for_previous_kernel() in every thread
// before it reads anything an earlier kernel wrote and before it writes anything, and before any
// early return. Then kernel N + 1 completes only after kernel N did, so "after the previous kernel"
// stays transitive down the stream. Without the attribute (or below sm_90) both calls do nothing.
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

// The prologue of a kernel with nothing to prefetch.
__device__ __forceinline__ void pdl_enter() {
    pdl_allow_next_kernel();
    pdl_wait_for_previous_kernel();
}

}  // namespace qs
