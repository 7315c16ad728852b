// Schedule tables and per-step coefficients, in the reference's double arithmetic (engine/samplers.py).
#include <cmath>
#include <stdexcept>
#include <string>

#include "runtime.h"

namespace stunet {
namespace {

std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

[[noreturn]] void bad_name(const char* argument, const std::string& got, const char* accepted) {
    throw std::invalid_argument(std::string(argument) + " must be one of " + accepted + ", got '" + got + "'");
}

std::vector<double> linspace(double start, double end, int n) {
    std::vector<double> out(static_cast<size_t>(n));
    if (n == 1) {
        out[0] = start;
        return out;
    }
    for (int i = 0; i < n; ++i) out[i] = start + (end - start) * static_cast<double>(i) / static_cast<double>(n - 1);
    return out;
}

double cosine_abar(double t, double n) {
    const double pi = 3.141592653589793;  // math.pi
    const double c = std::cos((t / n + 0.008) / 1.008 * pi / 2);
    return c * c;
}

}  // namespace

Schedule parse_schedule(const std::string& name) {
    const std::string k = lower(name);
    if (k == "linear") return Schedule::Linear;
    if (k == "scaled_linear") return Schedule::ScaledLinear;
    if (k == "cosine") return Schedule::Cosine;
    bad_name("schedule", name, "('linear', 'scaled_linear', 'cosine')");
}

Spacing parse_spacing(const std::string& name) {
    const std::string k = lower(name);
    if (k == "leading") return Spacing::Leading;
    if (k == "trailing") return Spacing::Trailing;
    if (k == "linspace") return Spacing::Linspace;
    bad_name("spacing", name, "('leading', 'trailing', 'linspace')");
}

Prediction parse_prediction(const std::string& name) {
    const std::string k = lower(name);
    if (k == "v") return Prediction::V;
    if (k == "eps") return Prediction::Eps;
    bad_name("prediction", name, "('v', 'eps')");
}

SamplerKind parse_sampler(const std::string& name) {
    const std::string k = lower(name);
    if (k == "ddim") return SamplerKind::DDIM;
    if (k == "ddpm") return SamplerKind::DDPM;
    if (k == "dpmpp2m") return SamplerKind::DPMPP2M;
    bad_name("sampler", name, "('ddim', 'ddpm', 'dpmpp2m')");
}

DType parse_dtype(const std::string& name) {
    const std::string k = lower(name);
    if (k == "float32" || k == "f32") return DType::F32;
    if (k == "float16" || k == "f16") return DType::F16;
    if (k == "bfloat16" || k == "bf16") return DType::BF16;
    bad_name("dtype", name, "('float32', 'float16', 'bfloat16')");
}

std::vector<double> make_betas(Schedule schedule, int n, double beta_start, double beta_end) {
    if (n < 2) throw std::invalid_argument("num_train_timesteps must be >= 2, got " + std::to_string(n));
    const bool ranged = schedule == Schedule::Linear || schedule == Schedule::ScaledLinear;
    if (!ranged && !(std::isnan(beta_start) && std::isnan(beta_end)))
        throw std::invalid_argument("the cosine schedule takes no beta_start / beta_end");
    const double lo = std::isnan(beta_start) ? (schedule == Schedule::Linear ? 1e-4 : 0.00085) : beta_start;
    const double hi = std::isnan(beta_end) ? (schedule == Schedule::Linear ? 2e-2 : 0.012) : beta_end;
    if (ranged && !(0 < lo && lo <= hi && hi < 1))
        throw std::invalid_argument("beta_start and beta_end must satisfy 0 < beta_start <= beta_end < 1");
    switch (schedule) {
        case Schedule::Linear:
            return linspace(lo, hi, n);
        case Schedule::ScaledLinear: {
            std::vector<double> b = linspace(std::sqrt(lo), std::sqrt(hi), n);
            for (double& v : b) v = v * v;
            return b;
        }
        case Schedule::Cosine: {
            std::vector<double> b(static_cast<size_t>(n));
            for (int i = 0; i < n; ++i) b[i] = std::min(1 - cosine_abar(i + 1, n) / cosine_abar(i, n), 0.999);
            return b;
        }
    }
    throw std::invalid_argument("unknown schedule");
}

std::vector<double> make_alphas_cumprod(const std::vector<double>& betas) {
    std::vector<double> out(betas.size());
    double p = 1.0;
    for (size_t i = 0; i < betas.size(); ++i) {
        p *= 1.0 - betas[i];
        out[i] = p;
    }
    return out;
}

std::vector<int64_t> make_timesteps(int n, int N, Spacing spacing, int64_t steps_offset, bool solver_grid) {
    if (n < 1 || n > N)
        throw std::invalid_argument("num_inference_steps must be in [1, " + std::to_string(N) + "], got " +
                                    std::to_string(n));
    const int points = solver_grid ? n + 1 : n;
    const std::vector<double> grid = linspace(0.0, N - 1.0, points);
    std::vector<int64_t> ts(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) {
        const int j = points - 1 - i;  // descending
        switch (spacing) {
            case Spacing::Leading:
                ts[i] = static_cast<int64_t>(j) * (N / points) + steps_offset;
                break;
            case Spacing::Trailing:  // round(N - i N / n) - 1, already descending in i
                ts[i] = static_cast<int64_t>(std::nearbyint(N - static_cast<double>(i) * N / n)) - 1;
                break;
            case Spacing::Linspace:
                ts[i] = static_cast<int64_t>(std::nearbyint(grid[j]));
                break;
        }
    }
    return ts;
}

Scheduler::Scheduler(SamplerKind kind, Schedule schedule, Prediction prediction, Spacing spacing,
                     int num_train_timesteps, double eta, bool clip_sample, double clip_range, double beta_start,
                     double beta_end, int64_t steps_offset, bool set_alpha_to_one, bool fixed_stride)
    : kind_(kind), prediction_(prediction), spacing_(spacing), num_train_timesteps_(num_train_timesteps),
      eta_(eta), clip_range_(clip_range), clip_(clip_sample), steps_offset_(steps_offset),
      fixed_stride_(fixed_stride) {
    if (steps_offset < 0)
        throw std::invalid_argument("steps_offset must be >= 0, got " + std::to_string(steps_offset));
    if (!(eta >= 0.0 && eta <= 1.0)) throw std::invalid_argument("eta must be in [0, 1], got " + std::to_string(eta));
    if (eta != 0.0 && kind != SamplerKind::DDIM)
        throw std::invalid_argument("eta is a DDIM parameter; this sampler does not take it");
    if (!(clip_range > 0.0))
        throw std::invalid_argument("clip_range must be positive, got " + std::to_string(clip_range));
    betas_ = make_betas(schedule, num_train_timesteps, beta_start, beta_end);
    abar_ = make_alphas_cumprod(betas_);
    final_abar_ = set_alpha_to_one ? 1.0 : abar_[0];
}

void Scheduler::set_timesteps(int n) {
    std::vector<int64_t> ts =
        make_timesteps(n, num_train_timesteps_, spacing_, steps_offset_, kind_ == SamplerKind::DPMPP2M);
    if (ts.front() >= num_train_timesteps_)
        throw std::invalid_argument("steps_offset puts timestep " + std::to_string(ts.front()) +
                                    " past the last training timestep");
    timesteps_ = std::move(ts);
    stride_ = fixed_stride_ ? num_train_timesteps_ / n : 0;
    reset();
}

void Scheduler::set_timesteps(const std::vector<int64_t>& timesteps) {
    if (timesteps.empty()) throw std::invalid_argument("timesteps must not be empty");
    for (size_t i = 0; i < timesteps.size(); ++i) {
        if (timesteps[i] < 0 || timesteps[i] >= num_train_timesteps_ || (i > 0 && timesteps[i] >= timesteps[i - 1]))
            throw std::invalid_argument("timesteps must be strictly descending integers in [0, " +
                                        std::to_string(num_train_timesteps_ - 1) + "]");
    }
    timesteps_ = timesteps;
    stride_ = 0;  // explicit timesteps step to the next one given
    reset();
}

void Scheduler::reset() {
    has_history_ = false;
    prev_lambda_ = 0.0;
}

double Scheduler::abar(int64_t t) const {
    if (t < 0) return 1.0;
    if (t >= static_cast<int64_t>(abar_.size()))
        throw std::invalid_argument("timestep must be < num_train_timesteps, got " + std::to_string(t));
    return abar_[static_cast<size_t>(t)];
}

size_t Scheduler::index_of(int64_t t) const {
    if (timesteps_.empty()) throw std::logic_error("Scheduler.step: call set_timesteps(n) first");
    for (size_t i = 0; i < timesteps_.size(); ++i)
        if (timesteps_[i] == t) return i;
    throw std::invalid_argument("timestep " + std::to_string(t) +
                                " is not in this sampler's timesteps; step through timesteps()");
}

int64_t Scheduler::prev_timestep(int64_t t) const {
    const size_t i = index_of(t);
    if (stride_ > 0) return t - stride_ < 0 ? -1 : t - stride_;
    return i + 1 < timesteps_.size() ? timesteps_[i + 1] : -1;
}

StepCoefs Scheduler::step_coefs(int64_t t) {
    const size_t i = index_of(t);
    const int64_t t_prev = prev_timestep(t);
    const double a = abar(t), a_prev = abar(t_prev);
    StepCoefs k;
    k.kind = kind_;
    k.prediction = prediction_;
    k.alpha = static_cast<float>(std::sqrt(a));
    k.sigma = static_cast<float>(std::sqrt(1 - a));
    k.inv_alpha = 1.f / k.alpha;
    k.clip = clip_;
    k.clip_lo = static_cast<float>(-clip_range_);
    k.clip_hi = static_cast<float>(clip_range_);
    switch (kind_) {
        case SamplerKind::DDIM: {
            const double a_end = t_prev < 0 ? final_abar_ : a_prev;  // set_alpha_to_one=false: abar[0]
            const double s = eta_ * std::sqrt((1 - a_end) / (1 - a) * (1 - a / a_end));
            k.c_x0 = static_cast<float>(std::sqrt(a_end));
            k.c_eps = static_cast<float>(std::sqrt(std::max(1 - a_end - s * s, 0.0)));
            k.needs_noise = s > 0;
            k.c_noise = static_cast<float>(s);
            break;
        }
        case SamplerKind::DDPM: {
            const double alpha_step = a / a_prev, beta_step = 1 - alpha_step;
            k.c_x0 = static_cast<float>(std::sqrt(a_prev) * beta_step / (1 - a));
            k.c_x = static_cast<float>(std::sqrt(alpha_step) * (1 - a_prev) / (1 - a));
            k.needs_noise = t_prev >= 0;
            k.c_noise = k.needs_noise ? static_cast<float>(std::sqrt(std::max((1 - a_prev) / (1 - a) * beta_step, 1e-20)))
                                      : 0.f;
            break;
        }
        case SamplerKind::DPMPP2M: {
            const double lam = 0.5 * std::log(a / (1 - a));
            k.writes_history = true;
            if (t_prev < 0) {
                k.to_x0 = true;
            } else {
                const double lam_prev = 0.5 * std::log(a_prev / (1 - a_prev));
                const double h = lam_prev - lam;
                const double alpha_p = std::sqrt(a_prev), sigma_p = std::sqrt(1 - a_prev), sigma = std::sqrt(1 - a);
                const double phi = std::expm1(-h);
                k.c_x = static_cast<float>(sigma_p / sigma);
                k.c_x0 = static_cast<float>(alpha_p * phi);
                if (has_history_ && i > 0) {
                    const double r = (lam - prev_lambda_) / h;
                    k.second_order = true;
                    k.r = static_cast<float>(r);
                    k.inv_r = 1.f / k.r;
                    k.c_d1 = static_cast<float>(0.5 * alpha_p * phi);
                }
            }
            has_history_ = true;
            prev_lambda_ = lam;
            break;
        }
    }
    return k;
}

}  // namespace stunet
