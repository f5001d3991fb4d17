// Fast exact path of the GPU sampler: the head of the candidate order (at most QS_HEAD_CAP ids
// whose value lies within a whole number of histogram bins of the maximum) is compacted, sorted
// by candidate key in shared memory and scanned in the spec's order with a sequential float64
// running sum, as numpy's cumsum does. When a truncation or the draw falls past the head, the
// caller falls back to the bisection of sampling_bisect.cuh. Per-segment maxima, float64 masses
// and bin counts come from the segment kernels (sampling.cu), so one block per row reads its row
// once more, for the compaction.
#pragma once
#include "sampling_bisect.cuh"

#define QS_SEGMENTS 32       // vocabulary segments per row in the segment kernels
#define QS_HIST_BINS 256     // bins of (x_max - x) of width 1/8: the head spans at most 32 nats
#define QS_HEAD_CAP 1024
#define QS_FALLBACK (-1)

namespace qs {

__device__ __forceinline__ float key_value(unsigned long long key) {
    const unsigned ordered = ~(unsigned)(key >> 32);
    const unsigned bits = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
    return __uint_as_float(bits);
}

__device__ __forceinline__ int key_id(unsigned long long key) { return (int)(key & 0xffffffffull); }

// Histogram bin of a scaled value: floor((x_max - v) * 8), QS_HIST_BINS when 32 or more below.
// Monotone in v, so every set {bin <= b} is a prefix of the candidate order.
__device__ __forceinline__ int hist_bin(float x_max, float v) {
    const float d = __fsub_rn(x_max, v);
    return d < 32.0f ? (int)__fmul_rn(d, 8.0f) : QS_HIST_BINS;
}

struct HeadScratch {
    unsigned long long keys[QS_HEAD_CAP];
    double weight[QS_HEAD_CAP];   // exp(x - x_max), candidate order
    double running[QS_HEAD_CAP];  // sequential running sum of weight
    int bin_counts[QS_HIST_BINS];
    int head_count, last_bin, compacted, token;
};

__device__ __forceinline__ void bitonic_sort(unsigned long long* keys, int n) {
    for (int k = 2; k <= n; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = threadIdx.x; i < n; i += blockDim.x) {
                const int partner = i ^ j;
                if (partner > i) {
                    const unsigned long long a = keys[i], b = keys[partner];
                    if ((a > b) == ((i & k) == 0)) { keys[i] = b; keys[partner] = a; }
                }
            }
            __syncthreads();
        }
    }
}

// Chooses the head: the most whole bins whose counts sum to <= QS_HEAD_CAP. Thread 0 writes.
__device__ void choose_head(const int* seg_hist, HeadScratch& s) {
    for (int b = threadIdx.x; b < QS_HIST_BINS; b += blockDim.x) {
        int count = 0;
        for (int j = 0; j < QS_SEGMENTS; ++j) count += seg_hist[j * QS_HIST_BINS + b];
        s.bin_counts[b] = count;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int total = 0, last = -1;
        for (int b = 0; b < QS_HIST_BINS && total + s.bin_counts[b] <= QS_HEAD_CAP; ++b) {
            total += s.bin_counts[b];
            last = b;
        }
        s.head_count = total;
        s.last_bin = last;
        s.compacted = 0;
    }
    __syncthreads();
}

// Compacts, sorts and weighs the head; false when it is empty or inconsistent (caller falls back).
__device__ bool build_head(const SampleRow& r, HeadScratch& s) {
    if (s.last_bin < 0 || s.head_count == 0) return false;
    for (int i = threadIdx.x; i < r.vocab; i += blockDim.x) {
        const float v = scaled_value(r, i);
        if (hist_bin(r.x_max, v) <= s.last_bin) {
            const int slot = atomicAdd(&s.compacted, 1);  // slot order is irrelevant: sorted next
            if (slot < QS_HEAD_CAP) s.keys[slot] = candidate_key(v, i);
        }
    }
    __syncthreads();
    if (s.compacted != s.head_count) return false;
    int padded = 1;
    while (padded < s.head_count) padded <<= 1;
    for (int i = s.head_count + threadIdx.x; i < padded; i += blockDim.x) s.keys[i] = ~0ull;
    __syncthreads();
    bitonic_sort(s.keys, padded);
    for (int i = threadIdx.x; i < s.head_count; i += blockDim.x)
        s.weight[i] = exp((double)key_value(s.keys[i]) - (double)r.x_max);
    __syncthreads();
    return true;
}

// Thread 0: steps 6-7 of the spec on the sorted head. Returns the token or QS_FALLBACK when the
// answer may lie past the head. total_all: float64 mass of the whole vocabulary.
__device__ int decide_on_head(const SampleArgs& a, HeadScratch& s, int vocab, double total_all) {
    double sum = 0.0;
    for (int i = 0; i < s.head_count; ++i) { sum += s.weight[i]; s.running[i] = sum; }
    int n = s.head_count;
    bool beyond = n < vocab;  // candidates exist past the head and are still kept
    double kept_total = beyond ? total_all : s.running[n - 1];
    if (a.top_k > 0 && a.top_k < vocab) {
        if (a.top_k > n) return QS_FALLBACK;
        n = a.top_k; beyond = false; kept_total = s.running[n - 1];
    }
    if (a.top_p < 1.0) {
        const double target = a.top_p * kept_total;
        int count = 0;
        for (int i = 0; i < n; ++i) count += (s.running[i] - s.weight[i]) < target;
        if (count < n) { n = max(count, 1); beyond = false; }
        else if (beyond) return QS_FALLBACK;
    }
    if (a.min_p > 0.0) {
        int count = 0;
        for (int i = 0; i < n; ++i) count += s.weight[i] >= a.min_p;
        if (count < n) { n = max(count, 1); beyond = false; }
        else if (beyond) {
            // Past the head x_max - x >= (last_bin + 1) / 8, so weights are at most exp(-that).
            if (a.min_p > exp(-(double)(s.last_bin + 1) / 8.0) * (1.0 + 1e-6)) beyond = false;
            else return QS_FALLBACK;
        }
    }
    const double total = beyond ? kept_total : s.running[n - 1];
    const double target = (double)philox_uniform(a.seed, a.step) * total;
    for (int i = 0; i < n; ++i)
        if (s.running[i] > target) return key_id(s.keys[i]);
    return beyond ? QS_FALLBACK : key_id(s.keys[n - 1]);
}

}  // namespace qs
