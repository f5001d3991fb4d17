// GPU sampler implementing gpu_worker/sampling/sampler.py (see its docstring for the spec).
// Candidate order = ascending candidate_key (value desc, id asc). Truncations keep a prefix of that
// order, so each is a "cut" key; cuts are found by bisection over the 64-bit key space, each probe
// one pass over the vocabulary with a fixed-order float64 block sum (no sort, no atomics), so a
// row's token never depends on the other rows of the batch.
#include "sampling_common.cuh"

#define QS_SAMPLE_THREADS 512

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

// Steps 1-3 (bias, repetition, frequency/presence), in place, bit-exact IEEE float32.
// grid = (num_sampled), block = (256)
extern "C" __global__ void __launch_bounds__(256)
sampling_penalties_f32(float* logits, int vocab, const SampleArgs* args, const int* bias_ids,
                       const float* bias_values, const int* seen_ids, const int* output_ids,
                       const int* output_counts) {
    const SampleArgs a = args[blockIdx.x];
    float* row = logits + (size_t)a.row * vocab;
    if (threadIdx.x == 0) {  // the request's order matters when an id repeats
        for (int i = a.bias_offset; i < a.bias_offset + a.bias_count; ++i)
            row[bias_ids[i]] = __fadd_rn(row[bias_ids[i]], bias_values[i]);
    }
    __syncthreads();
    if (a.repetition_penalty != 1.0f) {
        for (int i = a.seen_offset + threadIdx.x; i < a.seen_offset + a.seen_count; i += blockDim.x) {
            const float v = row[seen_ids[i]];
            row[seen_ids[i]] = v > 0.0f ? __fdiv_rn(v, a.repetition_penalty) : __fmul_rn(v, a.repetition_penalty);
        }
    }
    __syncthreads();
    if (a.frequency_penalty != 0.0f || a.presence_penalty != 0.0f) {
        for (int i = a.output_offset + threadIdx.x; i < a.output_offset + a.output_count; i += blockDim.x) {
            const float v = row[output_ids[i]];
            const float penalty = __fmul_rn(a.frequency_penalty, (float)output_counts[i]);
            row[output_ids[i]] = __fsub_rn(__fsub_rn(v, penalty), a.presence_penalty);
        }
    }
}

// Steps 4-7: greedy argmax (lowest id at ties) or the truncated draw. grid = (num_sampled)
extern "C" __global__ void __launch_bounds__(QS_SAMPLE_THREADS)
sampling_draw_f32(const float* logits, int vocab, const SampleArgs* args, int* out_tokens) {
    __shared__ double scratch[32];
    __shared__ unsigned long long key_scratch[32];
    const SampleArgs a = args[blockIdx.x];
    qs::SampleRow r{logits + (size_t)a.row * vocab, vocab, 1.0f, 0.0f, scratch};
    if (a.temperature == 0.0f) {
        const unsigned long long best = qs::extreme_key(r, false, 0.0, key_scratch);
        if (threadIdx.x == 0) out_tokens[blockIdx.x] = (int)(best & 0xffffffffull);
        return;
    }
    r.temperature = a.temperature;
    const unsigned long long best = qs::extreme_key(r, false, 0.0, key_scratch);
    r.x_max = qs::scaled_value(r, (int)(best & 0xffffffffull));
    const int token = qs::sample_row(r, a, key_scratch);
    if (threadIdx.x == 0) out_tokens[blockIdx.x] = token;
}

// Logprobs of the raw logits (copy taken before the penalties): log-softmax in float64 of the
// sampled token and the num_top best ids (ties by lower id). grid = (num_sampled)
extern "C" __global__ void __launch_bounds__(QS_SAMPLE_THREADS)
sampling_logprobs_f32(const float* raw_logits, int vocab, const SampleArgs* args, const int* tokens,
                      float* out_logprob, int* out_top_ids, float* out_top_logprobs, int max_top) {
    __shared__ double scratch[32];
    __shared__ unsigned long long key_scratch[32];
    const SampleArgs a = args[blockIdx.x];
    if (!a.want_logprobs) return;
    qs::SampleRow r{raw_logits + (size_t)a.row * vocab, vocab, 1.0f, 0.0f, scratch};
    const unsigned long long best = qs::extreme_key(r, false, 0.0, key_scratch);
    r.x_max = r.x[best & 0xffffffffull];
    double sum = 0.0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) sum += exp((double)r.x[i] - (double)r.x_max);
    const double log_total = (double)r.x_max + log(qs::block_sum_f64(sum, scratch));
    if (threadIdx.x == 0) out_logprob[blockIdx.x] = (float)((double)r.x[tokens[blockIdx.x]] - log_total);
    unsigned long long previous = 0;
    for (int n = 0; n < a.num_top_logprobs && n < max_top; ++n) {
        unsigned long long next = ~0ull;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const unsigned long long key = qs::candidate_key(r.x[i], i);
            if ((n == 0 || key > previous) && key < next) next = key;
        }
        previous = qs::block_min_u64(next, key_scratch);
        const int id = (int)(previous & 0xffffffffull);
        if (threadIdx.x == 0) {
            out_top_ids[(size_t)blockIdx.x * max_top + n] = id;
            out_top_logprobs[(size_t)blockIdx.x * max_top + n] = (float)((double)r.x[id] - log_total);
        }
    }
}
