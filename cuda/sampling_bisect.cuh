// Exact sampling by bisection over the 64-bit candidate-key space (sampling.cu's fallback when the
// sorted head of the distribution does not decide the draw): each probe is one pass over the
// vocabulary on one block with a fixed-order float64 sum. Slow (~100 passes) but complete.
#pragma once
#include "sampling_common.cuh"

namespace qs {

struct SampleRow {
    const float* x;    // [vocab] processed logits
    int vocab;
    float temperature; // 1 = no scaling
    float x_max;       // max scaled value
    double* scratch;   // shared, >= 32
};

__device__ __forceinline__ float scaled_value(const SampleRow& r, int i) {
    return r.temperature == 1.0f ? r.x[i] : __fdiv_rn(r.x[i], r.temperature);
}

// Sum of weights exp(x - x_max) over candidates with key < bound (or <= bound when inclusive).
// With count_only the sum counts candidates instead.
__device__ double prefix_mass(const SampleRow& r, unsigned long long bound, bool inclusive, bool count_only) {
    double sum = 0.0;
    for (int i = threadIdx.x; i < r.vocab; i += blockDim.x) {
        const float v = scaled_value(r, i);
        const unsigned long long key = candidate_key(v, i);
        if (key < bound || (inclusive && key == bound))
            sum += count_only ? 1.0 : exp((double)v - (double)r.x_max);
    }
    return block_sum_f64(sum, r.scratch);
}

// Smallest key c in [lo, hi] with prefix_mass(c, inclusive) > target (>= when or_equal); hi when
// none. Probe results are block-uniform, so the loop is too.
__device__ unsigned long long bisect_first_above(const SampleRow& r, unsigned long long lo, unsigned long long hi,
                                                 double target, bool inclusive, bool count_only, bool or_equal) {
    while (lo < hi) {
        const unsigned long long mid = lo + (hi - lo) / 2;
        const double mass = prefix_mass(r, mid, inclusive, count_only);
        const bool above = or_equal ? mass >= target : mass > target;
        if (above) hi = mid; else lo = mid + 1;
    }
    return lo;
}

__device__ unsigned long long extreme_key(const SampleRow& r, bool want_max, double w_floor,
                                          unsigned long long* scratch) {
    unsigned long long best = ~0ull;
    for (int i = threadIdx.x; i < r.vocab; i += blockDim.x) {
        const float v = scaled_value(r, i);
        if (w_floor > 0.0 && exp((double)v - (double)r.x_max) < w_floor) continue;
        const unsigned long long key = candidate_key(v, i);
        best = min(best, want_max ? ~key : key);
    }
    best = block_min_u64(best, scratch);
    return want_max ? ~best : best;
}

// Steps 5-7 of the spec for one row; returns the token id.
__device__ int sample_row(const SampleRow& r, const SampleArgs& a, unsigned long long* key_scratch) {
    const unsigned long long first = extreme_key(r, false, 0.0, key_scratch);
    unsigned long long cut = extreme_key(r, true, 0.0, key_scratch);
    if (a.top_k > 0 && a.top_k < r.vocab)  // the k-th candidate: first key with k candidates <= it
        cut = bisect_first_above(r, first, cut, (double)a.top_k, true, true, true);
    if (a.top_p < 1.0) {
        // Candidate i is dropped once the mass strictly before it reaches target. The smallest key
        // c with mass(< c) >= target is (last kept key) + 1; target > 0 so c > first.
        const double target = a.top_p * prefix_mass(r, cut, true, false);
        const unsigned long long c = bisect_first_above(r, first, cut, target, false, false, true);
        if (prefix_mass(r, c, false, false) >= target) cut = c - 1;
    }
    if (a.min_p > 0.0) cut = min(cut, extreme_key(r, true, a.min_p, key_scratch));
    const double total = prefix_mass(r, cut, true, false);
    const double target = (double)philox_uniform(a.seed, a.step) * total;
    const unsigned long long chosen = bisect_first_above(r, first, cut, target, true, false, false);
    return (int)(chosen & 0xffffffffull);
}

}  // namespace qs
