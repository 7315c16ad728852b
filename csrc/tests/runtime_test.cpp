// C++-only test of the runtime core: links and runs with no Python (built by csrc/CMakeLists.txt and run from
// tests/test_runtime.py). Exit status 0 when every check passes; failures are printed one per line.
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "runtime.h"

using namespace stunet;

static int failures = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            std::printf("FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);      \
            ++failures;                                                      \
        }                                                                    \
    } while (0)

template <class F>
static bool throws_invalid(F f) {
    try {
        f();
    } catch (const std::invalid_argument&) {
        return true;
    }
    return false;
}

static void test_tables() {
    for (Spacing sp : {Spacing::Leading, Spacing::Trailing, Spacing::Linspace}) {
        for (int n = 1; n <= 1000; ++n) {
            const std::vector<int64_t> ts = make_timesteps(n, 1000, sp);
            bool ok = static_cast<int>(ts.size()) == n && ts.back() >= 0 && ts.front() <= 999;
            for (size_t i = 1; i < ts.size(); ++i) ok = ok && ts[i - 1] > ts[i];
            CHECK(ok);
        }
    }
    const std::vector<int64_t> lead = make_timesteps(10, 1000, Spacing::Leading);
    CHECK(lead.front() == 900 && lead.back() == 0);
    const std::vector<int64_t> trail = make_timesteps(10, 1000, Spacing::Trailing);
    CHECK(trail.front() == 999 && trail.back() == 99);
    const std::vector<double> lin = make_betas(Schedule::Linear, 1000);
    CHECK(lin.front() == 1e-4 && lin.back() == 2e-2);
    const std::vector<double> cos = make_betas(Schedule::Cosine, 1000);
    CHECK(cos.back() == 0.999);
    const std::vector<double> abar = make_alphas_cumprod(cos);
    bool decreasing = true;
    for (size_t i = 1; i < abar.size(); ++i) decreasing = decreasing && abar[i] < abar[i - 1];
    CHECK(decreasing && abar.front() < 1.0 && abar.front() > 0.99);
    CHECK(throws_invalid([] { make_timesteps(0, 1000, Spacing::Leading); }));
    CHECK(throws_invalid([] { parse_schedule("sigmoid"); }));
}

// An oracle prediction (the exact v or eps for a known x0) must land every sampler on x0 at the end.
static void test_oracle(SamplerKind kind, Prediction pred) {
    const int n = 64;
    std::vector<float> x0(n), x(n), out(n), history(n, 0.f), noise(n, 0.f), v(n);
    for (int i = 0; i < n; ++i) {
        x0[i] = std::sin(0.37f * i);
        x[i] = std::cos(1.3f * i);  // pure noise at t = T
    }
    Scheduler s(kind, Schedule::Cosine, pred, Spacing::Leading);
    s.set_timesteps(25);
    for (int64_t t : s.timesteps()) {
        const double a = s.abar(t), alpha = std::sqrt(a), sigma = std::sqrt(1 - a);
        for (int i = 0; i < n; ++i) {
            const double eps = (x[i] - alpha * x0[i]) / sigma;
            v[i] = static_cast<float>(pred == Prediction::Eps ? eps : alpha * eps - sigma * x0[i]);
        }
        StepArgs args;
        args.numel = n;
        args.cond = v.data();
        args.x = x.data();
        args.out = x.data();  // in place
        args.history = history.data();
        args.noise = noise.data();  // zero noise: stochastic samplers become deterministic here
        args.coefs = s.step_coefs(t);
        fused_step_cpu(args);
    }
    double worst = 0;
    for (int i = 0; i < n; ++i) worst = std::fmax(worst, std::fabs(x[i] - x0[i]));
    CHECK(worst < 2e-3);
}

static void test_guidance_and_fp16() {
    // guided = uncond + s (cond - uncond); with DDPM's final step (x_{t-1} = mean) this is checkable by hand.
    const int n = 16;
    std::vector<float> cond(n), uncond(n), x(n), out(n);
    for (int i = 0; i < n; ++i) {
        cond[i] = 0.1f * i;
        uncond[i] = -0.05f * i;
        x[i] = 0.5f;
    }
    Scheduler s(SamplerKind::DDIM, Schedule::Linear, Prediction::Eps, Spacing::Leading);
    s.set_timesteps(1);
    StepArgs args;
    args.numel = n;
    args.cond = cond.data();
    args.uncond = uncond.data();
    args.guidance_scale = 3.f;
    args.x = x.data();
    args.out = out.data();
    args.coefs = s.step_coefs(s.timesteps()[0]);
    fused_step_cpu(args);
    const double a = s.abar(s.timesteps()[0]);
    for (int i = 0; i < n; ++i) {
        const double g = uncond[i] + 3.0 * (cond[i] - uncond[i]);
        CHECK(std::fabs(out[i] - (x[i] - std::sqrt(1 - a) * g) / std::sqrt(a)) < 1e-5);  // DDIM to t=-1: x0
    }
    for (uint32_t h = 0; h < 0x10000; ++h) {
        if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) continue;  // NaN payloads are not preserved
        CHECK(f32_to_f16_bits(f16_bits_to_f32(static_cast<uint16_t>(h))) == h);
    }
    CHECK(f32_to_f16_bits(65520.f) == 0x7c00u && f32_to_f16_bits(65519.f) == 0x7bffu);
    CHECK(f32_to_f16_bits(std::ldexp(1.f, -25)) == 0 && f32_to_f16_bits(std::ldexp(1.5f, -25)) == 1);
    args.guidance_rescale = 2.f;
    CHECK(throws_invalid([&] { fused_step_cpu(args); }));
    args.guidance_rescale = 0.f;
    args.batch = 3;  // 16 elements do not split into 3 samples
    CHECK(throws_invalid([&] { fused_step_cpu(args); }));
}

static void test_multidiffusion() {
    const std::vector<int64_t> plan = window_plan(80, 16, 2);
    CHECK((plan == std::vector<int64_t>{0, 14, 28, 42, 56, 64}));
    CHECK((window_plan(10, 16, 2) == std::vector<int64_t>{0}));
    CHECK(throws_invalid([] { window_plan(80, 16, 16); }));
    for (int64_t T = 1; T <= 120; ++T) {
        for (Weighting w : {Weighting::Uniform, Weighting::Ramp}) {
            const BlendTable t = blend_table(T, 7, 3, w);
            bool ok = true;
            for (int64_t f = 0; f < T; ++f) {
                double sum = 0;
                for (int64_t c = 0; c < t.cover; ++c)
                    if (t.window[f * t.cover + c] >= 0) sum += t.weight[f * t.cover + c];
                ok = ok && std::fabs(sum - 1.0) < 1e-6;
            }
            CHECK(ok);
        }
    }
    // Windows whose outputs are constant c_i blend to the weighted mean on every pixel.
    const BlendTable t = blend_table(20, 8, 3, Weighting::Uniform);
    const int64_t rows = 2, plane = 5;
    std::vector<float> in(t.num_windows * rows * t.window_len * plane), out(rows * 20 * plane);
    for (int64_t i = 0; i < static_cast<int64_t>(in.size()); ++i) in[i] = static_cast<float>(i / (rows * t.window_len * plane));
    BlendArgs b;
    b.window = t.window.data();
    b.local = t.local.data();
    b.weight = t.weight.data();
    b.cover = t.cover;
    b.num_windows = t.num_windows;
    b.rows = rows;
    b.window_len = t.window_len;
    b.num_frames = 20;
    b.plane = plane;
    b.in = in.data();
    b.out = out.data();
    blend_cpu(b);
    const std::vector<int64_t> starts = window_plan(20, 8, 3);
    for (int64_t f = 0; f < 20; ++f) {
        double sum = 0, count = 0;
        for (size_t i = 0; i < starts.size(); ++i)
            if (starts[i] <= f && f < starts[i] + 8) sum += static_cast<double>(i), count += 1;
        CHECK(std::fabs(out[(1 * 20 + f) * plane + 3] - sum / count) < 1e-6);
    }
}

int main() {
    test_tables();
    for (SamplerKind k : {SamplerKind::DDIM, SamplerKind::DDPM, SamplerKind::DPMPP2M})
        for (Prediction p : {Prediction::V, Prediction::Eps}) test_oracle(k, p);
    test_guidance_and_fp16();
    test_multidiffusion();
    std::printf("%s: %d failure(s)\n", build_info().c_str(), failures);
    return failures ? 1 : 0;
}
