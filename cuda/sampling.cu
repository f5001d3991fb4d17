// GPU sampler implementing gpu_worker/sampling/sampler.py (see its docstring for the spec).
// Candidate order = ascending candidate_key (value desc, id asc); truncations keep a prefix of it.
// Per step: penalties (in place) -> segment maxima -> segment float64 masses + bin counts (both
// QS_SEGMENTS blocks per row) -> draw (one block per row: the sorted head, sampling_head.cuh, or
// the bisection fallback, sampling_bisect.cuh). Every sum has a fixed order and every value a
// fixed segment, so a row's token never depends on the other rows of the batch.
#include "sampling_bisect.cuh"
#include "sampling_head.cuh"

#define QS_SAMPLE_THREADS 512



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

namespace qs {

__device__ __forceinline__ SampleRow row_of(const float* logits, int vocab, const SampleArgs& a, double* scratch) {
    return SampleRow{logits + (size_t)a.row * vocab, vocab, a.temperature == 0.0f ? 1.0f : a.temperature,
                     0.0f, scratch};
}

__device__ __forceinline__ void segment_range(int vocab, int segment, int* begin, int* end) {
    const int length = (vocab + QS_SEGMENTS - 1) / QS_SEGMENTS;
    *begin = min(vocab, segment * length);
    *end = min(vocab, *begin + length);
}

__device__ __forceinline__ unsigned long long best_key(const unsigned long long* seg_best) {
    unsigned long long best = ~0ull;
    for (int j = 0; j < QS_SEGMENTS; ++j) best = min(best, seg_best[j]);
    return best;
}

}  // namespace qs

// Best candidate key (max scaled value, lowest id) of each vocabulary segment.
// grid = (num_sampled, QS_SEGMENTS), block = (256); seg_best: [num_sampled, QS_SEGMENTS]
extern "C" __global__ void __launch_bounds__(256)
sampling_segment_best_f32(const float* logits, int vocab, const SampleArgs* args, unsigned long long* seg_best) {
    __shared__ unsigned long long key_scratch[32];
    const SampleArgs a = args[blockIdx.x];
    const qs::SampleRow r = qs::row_of(logits, vocab, a, nullptr);
    int begin, end;
    qs::segment_range(vocab, blockIdx.y, &begin, &end);
    unsigned long long best = ~0ull;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) best = min(best, qs::candidate_key(qs::scaled_value(r, i), i));
    best = qs::block_min_u64(best, key_scratch);
    if (threadIdx.x == 0) seg_best[blockIdx.x * QS_SEGMENTS + blockIdx.y] = best;
}

// Per segment: float64 mass sum exp(x - x_max) and counts per histogram bin (not for greedy rows).
// grid = (num_sampled, QS_SEGMENTS), block = (256); seg_mass: [num_sampled, QS_SEGMENTS] f64;
// seg_hist: [num_sampled, QS_SEGMENTS, QS_HIST_BINS] int32
extern "C" __global__ void __launch_bounds__(256)
sampling_segment_stats_f32(const float* logits, int vocab, const SampleArgs* args,
                           const unsigned long long* seg_best, double* seg_mass, int* seg_hist) {
    __shared__ double scratch[32];
    __shared__ int bins[QS_HIST_BINS];
    const SampleArgs a = args[blockIdx.x];
    if (a.temperature == 0.0f) return;
    qs::SampleRow r = qs::row_of(logits, vocab, a, scratch);
    r.x_max = qs::key_value(qs::best_key(seg_best + blockIdx.x * QS_SEGMENTS));
    for (int b = threadIdx.x; b < QS_HIST_BINS; b += blockDim.x) bins[b] = 0;
    __syncthreads();
    int begin, end;
    qs::segment_range(vocab, blockIdx.y, &begin, &end);
    double mass = 0.0;
    for (int i = begin + threadIdx.x; i < end; i += blockDim.x) {
        const float v = qs::scaled_value(r, i);
        mass += exp((double)v - (double)r.x_max);
        const int bin = qs::hist_bin(r.x_max, v);
        if (bin < QS_HIST_BINS) atomicAdd(&bins[bin], 1);  // integer counts: order-free
    }
    mass = qs::block_sum_f64(mass, scratch);
    const size_t segment = (size_t)blockIdx.x * QS_SEGMENTS + blockIdx.y;
    if (threadIdx.x == 0) seg_mass[segment] = mass;
    __syncthreads();
    for (int b = threadIdx.x; b < QS_HIST_BINS; b += blockDim.x) seg_hist[segment * QS_HIST_BINS + b] = bins[b];
}

// Steps 4-7: greedy argmax (lowest id at ties) or the truncated draw. grid = (num_sampled),
// block = (QS_SAMPLE_THREADS)
extern "C" __global__ void __launch_bounds__(QS_SAMPLE_THREADS)
sampling_draw_f32(const float* logits, int vocab, const SampleArgs* args, const unsigned long long* seg_best,
                  const double* seg_mass, const int* seg_hist, int* out_tokens) {
    __shared__ double scratch[32];
    __shared__ unsigned long long key_scratch[32];
    __shared__ qs::HeadScratch head;
    const SampleArgs a = args[blockIdx.x];
    const unsigned long long best = qs::best_key(seg_best + blockIdx.x * QS_SEGMENTS);
    if (a.temperature == 0.0f) {
        if (threadIdx.x == 0) out_tokens[blockIdx.x] = qs::key_id(best);
        return;
    }
    qs::SampleRow r = qs::row_of(logits, vocab, a, scratch);
    r.x_max = qs::key_value(best);
    qs::choose_head(seg_hist + (size_t)blockIdx.x * QS_SEGMENTS * QS_HIST_BINS, head);
    const bool have_head = qs::build_head(r, head);
    if (threadIdx.x == 0) {
        double total_all = 0.0;
        for (int j = 0; j < QS_SEGMENTS; ++j) total_all += seg_mass[blockIdx.x * QS_SEGMENTS + j];
        head.token = have_head ? qs::decide_on_head(a, head, vocab, total_all) : QS_FALLBACK;
    }
    __syncthreads();
    const int token = head.token == QS_FALLBACK ? qs::sample_row(r, a, key_scratch) : head.token;
    if (threadIdx.x == 0) out_tokens[blockIdx.x] = token;
}

// The first sampler (one block per row, bisection only; measured ~13 ms per step on an H200,
// verified against the spec): kept as a switchable reference, QWEN_SERVE_GPU_SAMPLER=bisect.
// grid = (num_sampled), block = (QS_SAMPLE_THREADS)
extern "C" __global__ void __launch_bounds__(QS_SAMPLE_THREADS)
sampling_draw_bisect_f32(const float* logits, int vocab, const SampleArgs* args, int* out_tokens) {
    __shared__ double scratch[32];
    __shared__ unsigned long long key_scratch[32];
    const SampleArgs a = args[blockIdx.x];
    qs::SampleRow r{logits + (size_t)a.row * vocab, vocab, 1.0f, 0.0f, scratch};
    if (a.temperature == 0.0f) {
        const unsigned long long best = qs::extreme_key(r, false, 0.0, key_scratch);
        if (threadIdx.x == 0) out_tokens[blockIdx.x] = qs::key_id(best);
        return;
    }
    r.temperature = a.temperature;
    const unsigned long long best = qs::extreme_key(r, false, 0.0, key_scratch);
    r.x_max = qs::scaled_value(r, qs::key_id(best));
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
