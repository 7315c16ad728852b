// Argument checks and the CPU passes of the fused step and the blend (single-threaded, one pass each).
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "runtime.h"
#include "step_math.h"

namespace stunet {
namespace {

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// Splits [begin, end) over hardware threads when there is enough work to pay for starting them (the passes
// are memory-bound: a thread per core, contiguous chunks). Results do not depend on the split.
template <class F>
void parallel_for(int64_t begin, int64_t end, F&& body, int64_t min_per_thread = 1 << 18) {
    const int64_t n = end - begin;
    static const int64_t hw = std::max<int64_t>(1, std::thread::hardware_concurrency());
    const int64_t threads = std::min(hw, n / std::max<int64_t>(1, min_per_thread));
    if (threads <= 1) return body(begin, end);
    std::vector<std::thread> pool;
    const int64_t chunk = (n + threads - 1) / threads;
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t lo = begin + t * chunk, hi = std::min(end, lo + chunk);
        if (lo < hi) pool.emplace_back([&body, lo, hi] { body(lo, hi); });
    }
    body(begin, std::min(end, begin + chunk));
    for (std::thread& th : pool) th.join();
}

template <DType D> struct Storage;
template <> struct Storage<DType::F32> {
    using type = float;
    static float load(const float* p, int64_t i) { return p[i]; }
    static void store(float* p, int64_t i, float v) { p[i] = v; }
};
template <> struct Storage<DType::F16> {
    using type = uint16_t;
    static float load(const uint16_t* p, int64_t i) { return detail::f16_to_f32(p[i]); }
    static void store(uint16_t* p, int64_t i, float v) { p[i] = detail::f32_to_f16(v); }
};
template <> struct Storage<DType::BF16> {
    using type = uint16_t;
    static float load(const uint16_t* p, int64_t i) { return detail::bf16_to_f32(p[i]); }
    static void store(uint16_t* p, int64_t i, float v) { p[i] = detail::f32_to_bf16(v); }
};

// One sample's elements [begin, end), specialised on the dtypes, the sampler and the prediction type. Blocks
// of kBlock elements go through one simple loop per stage (load, guide, rescale, update, store), each of which
// vectorises; the per-element arithmetic is unchanged, so the result is too.
template <DType P, DType X, SamplerKind K, Prediction PR>
void step_range(const StepArgs& a, int64_t begin, int64_t end, float factor) {
    using SP = Storage<P>;
    using SX = Storage<X>;
    constexpr int64_t kBlock = 512;
    const auto* cond = static_cast<const typename SP::type*>(a.cond);
    const auto* uncond = static_cast<const typename SP::type*>(a.uncond);
    const auto* x = static_cast<const typename SX::type*>(a.x);
    auto* out = static_cast<typename SX::type*>(a.out);
    const StepCoefs k = a.coefs;
    const bool has_u = uncond != nullptr, rescaled = has_u && a.guidance_rescale != 0.f;
    const float scale = a.guidance_scale, r = a.guidance_rescale;
    const float one_minus_r = static_cast<float>(1.0 - static_cast<double>(a.guidance_rescale));
    float g[kBlock], u[kBlock], xv[kBlock], res[kBlock], x0[kBlock], zeros[kBlock] = {};
    for (int64_t i0 = begin; i0 < end; i0 += kBlock) {
        const int64_t n = std::min(kBlock, end - i0);
        for (int64_t j = 0; j < n; ++j) g[j] = SP::load(cond, i0 + j);
        if (has_u) {
            for (int64_t j = 0; j < n; ++j) u[j] = SP::load(uncond, i0 + j);
            for (int64_t j = 0; j < n; ++j) g[j] = detail::guide<P>(g[j], u[j], true, scale);
        }
        if (rescaled)
            for (int64_t j = 0; j < n; ++j) g[j] = detail::rescale<P>(g[j], factor, r, one_minus_r);
        for (int64_t j = 0; j < n; ++j) xv[j] = SX::load(x, i0 + j);
        const float* prev = k.second_order ? a.history + i0 : zeros;
        const float* z = k.needs_noise ? a.noise + i0 : zeros;
        for (int64_t j = 0; j < n; ++j) res[j] = detail::update_as<K, PR>(k, g[j], xv[j], prev[j], z[j], &x0[j]);
        if (k.writes_history)
            for (int64_t j = 0; j < n; ++j) a.history[i0 + j] = x0[j];
        for (int64_t j = 0; j < n; ++j) SX::store(out, i0 + j, res[j]);
    }
}

template <DType P>
float rescale_factor_of(const StepArgs& a, int64_t begin, int64_t end) {
    using SP = Storage<P>;
    const auto* cond = static_cast<const typename SP::type*>(a.cond);
    const auto* uncond = static_cast<const typename SP::type*>(a.uncond);
    // Per-sample (sum, sum of squares) of cond and of the guided prediction in double, over fixed chunks summed
    // in chunk order: the same result for any thread count.
    constexpr int64_t kChunk = 1 << 16;
    const int64_t chunks = (end - begin + kChunk - 1) / kChunk;
    std::vector<double> partial(static_cast<size_t>(4 * chunks), 0.0);
    parallel_for(0, chunks, [&](int64_t lo, int64_t hi) {
        for (int64_t ch = lo; ch < hi; ++ch) {
            double* s = partial.data() + 4 * ch;
            const int64_t stop = std::min(end, begin + (ch + 1) * kChunk);
            for (int64_t i = begin + ch * kChunk; i < stop; ++i) {
                const float c = SP::load(cond, i);
                detail::accumulate_stats(s, c, detail::guide<P>(c, SP::load(uncond, i), true, a.guidance_scale));
            }
        }
    }, 4);
    double s[4] = {0, 0, 0, 0};
    for (int64_t ch = 0; ch < chunks; ++ch)
        for (int k = 0; k < 4; ++k) s[k] += partial[4 * ch + k];
    return detail::rescale_factor(s, end - begin);
}

template <DType P, DType X, SamplerKind K, Prediction PR>
void step_loop(const StepArgs& a) {
    const int64_t per_sample = a.numel / a.batch;
    const bool rescaled = a.uncond != nullptr && a.guidance_rescale != 0.f;
    if (!rescaled)  // no per-sample factor: one range over the whole video
        return parallel_for(0, a.numel, [&](int64_t lo, int64_t hi) { step_range<P, X, K, PR>(a, lo, hi, 1.f); });
    for (int64_t b = 0; b < a.batch; ++b) {
        const int64_t begin = b * per_sample, end = begin + per_sample;
        const float factor = rescale_factor_of<P>(a, begin, end);
        parallel_for(begin, end, [&](int64_t lo, int64_t hi) { step_range<P, X, K, PR>(a, lo, hi, factor); });
    }
}

template <DType P, DType X>
void step_dispatch(const StepArgs& a) {
    const bool eps = a.coefs.prediction == Prediction::Eps;
    switch (a.coefs.kind) {
        case SamplerKind::DDIM:
            return eps ? step_loop<P, X, SamplerKind::DDIM, Prediction::Eps>(a)
                       : step_loop<P, X, SamplerKind::DDIM, Prediction::V>(a);
        case SamplerKind::DDPM:
            return eps ? step_loop<P, X, SamplerKind::DDPM, Prediction::Eps>(a)
                       : step_loop<P, X, SamplerKind::DDPM, Prediction::V>(a);
        case SamplerKind::DPMPP2M:
            return eps ? step_loop<P, X, SamplerKind::DPMPP2M, Prediction::Eps>(a)
                       : step_loop<P, X, SamplerKind::DPMPP2M, Prediction::V>(a);
    }
}

template <DType I, DType O>
void blend_loop(const BlendArgs& a) {
    using SI = Storage<I>;
    using SO = Storage<O>;
    const auto* in = static_cast<const typename SI::type*>(a.in);
    auto* out = static_cast<typename SO::type*>(a.out);
    auto rows = [&](int64_t lo, int64_t hi) {  // items are (row, frame) planes
        std::vector<float> acc(static_cast<size_t>(a.plane));
        for (int64_t rf = lo; rf < hi; ++rf) {
            const int64_t r = rf / a.num_frames, f = rf % a.num_frames;
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t c = 0; c < a.cover; ++c) {  // window order, as the reference accumulates
                const int32_t w = a.window[f * a.cover + c];
                if (w < 0) break;
                const float weight = a.weight[f * a.cover + c];
                const int64_t src = ((w * a.rows + r) * a.window_len + a.local[f * a.cover + c]) * a.plane;
                for (int64_t p = 0; p < a.plane; ++p) {  // contiguous: vectorises
                    const float term = SI::load(in, src + p) * weight;
                    acc[p] = acc[p] + term;
                }
            }
            for (int64_t p = 0; p < a.plane; ++p) SO::store(out, rf * a.plane + p, acc[p]);
        }
    };
    parallel_for(0, a.rows * a.num_frames, rows, std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, a.plane)));
}

}  // namespace

void check(const StepArgs& a) {
    if (a.numel < 0) bad("numel must be >= 0, got " + std::to_string(a.numel));
    if (a.batch < 1) bad("batch must be >= 1, got " + std::to_string(a.batch));
    if (a.numel % a.batch) bad("numel (" + std::to_string(a.numel) + ") must be a multiple of batch (" + std::to_string(a.batch) + ")");
    if (a.numel && (!a.cond || !a.x || !a.out)) bad("cond, x and out must be non-null");
    if (a.guidance_rescale < 0.f || a.guidance_rescale > 1.f)
        bad("guidance_rescale must be in [0, 1], got " + std::to_string(a.guidance_rescale));
    if (a.guidance_rescale != 0.f && !a.uncond) bad("guidance_rescale needs uncond (it rescales a guided prediction)");
    const StepCoefs& k = a.coefs;
    if ((k.second_order || k.writes_history) && !a.history && a.numel)
        bad("history must be given: this DPM-Solver++ step reads or writes the previous x0");
    if (k.needs_noise && !a.noise && a.numel) bad("noise must be given: this step of a stochastic sampler adds noise");
}

void check(const BlendArgs& a) {
    if (a.rows < 0 || a.plane < 0) bad("rows and plane must be >= 0");
    if (a.num_windows < 1 || a.window_len < 1 || a.num_frames < 1 || a.cover < 1)
        bad("the blend table is empty: build it with blend_table(num_frames, window, overlap, weighting)");
    if (a.window_len > a.num_frames) bad("window_len must be <= num_frames");
    if (!a.window || !a.local || !a.weight) bad("the blend table pointers must be non-null");
    if (a.rows > 0 && a.plane > 0 && (!a.in || !a.out)) bad("in and out must be non-null");
}

void fused_step_cpu(const StepArgs& a) {
    check(a);
    detail::with_dtype(a.pred_dtype, [&](auto p) {
        detail::with_dtype(a.x_dtype, [&](auto x) { step_dispatch<decltype(p)::value, decltype(x)::value>(a); });
    });
}

void blend_cpu(const BlendArgs& a) {
    check(a);
    detail::with_dtype(a.in_dtype, [&](auto i) {
        detail::with_dtype(a.out_dtype, [&](auto o) { blend_loop<decltype(i)::value, decltype(o)::value>(a); });
    });
}

uint16_t f32_to_f16_bits(float value) { return detail::f32_to_f16(value); }
uint16_t f32_to_bf16_bits(float value) { return detail::f32_to_bf16(value); }
float f16_bits_to_f32(uint16_t bits) { return detail::f16_to_f32(bits); }

std::string build_info() {
    std::string s = "stunet runtime: C++" + std::to_string(__cplusplus / 100 % 100) + ", cpu";
#ifdef STUNET_WITH_CUDA
    s += ", cuda";
#endif
    return s;
}

}  // namespace stunet
