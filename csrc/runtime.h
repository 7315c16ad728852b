// stunet denoising runtime: schedule tables, the fused sampler step and MultiDiffusion window blending.
//
// Plain C++17 with no Python or torch dependency, so products that run an exported engine link the same core
// (csrc/CMakeLists.txt builds it as a static library). The pybind11 module stunet._C (bindings.cpp) exposes it
// to Python on raw pointers; CUDA versions of the two passes live in runtime_cuda.cu, built on explicit opt-in.
//
// Reference semantics are engine/samplers.py and engine/multidiffusion.py. Every table and every element is
// computed in the reference's exact operation order (fp32 tensors times Python floats cast to fp32, torch's
// per-op rounding of fp16 tensors, no contracted multiply-adds), so the runtime reproduces the Python
// reference bit for bit wherever the reference is deterministic; only guidance rescale's per-sample standard
// deviation is reduced in a different order.
//
// Layout legend: B batch, C channels, T frames, H x W plane; a "row" is one (b, c), a "plane" is H * W.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace stunet {

enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };
enum class Schedule : int32_t { Linear, ScaledLinear, Cosine };
enum class Spacing : int32_t { Leading, Trailing, Linspace };
enum class Prediction : int32_t { V, Eps };
enum class SamplerKind : int32_t { DDIM, DDPM, DPMPP2M };
enum class Weighting : int32_t { Uniform, Ramp };

// Names as the Python API spells them ("cosine", "trailing", "v", "ddim", "dpmpp2m", "ramp", ...);
// unknown names throw std::invalid_argument naming the argument and the accepted values.
Schedule parse_schedule(const std::string& name);
Spacing parse_spacing(const std::string& name);
Prediction parse_prediction(const std::string& name);
SamplerKind parse_sampler(const std::string& name);
Weighting parse_weighting(const std::string& name);
DType parse_dtype(const std::string& name);

// ---- schedule tables (double, as the reference) -----------------------------------------------------------
// beta_start / beta_end: NaN takes the schedule's defaults (linear 1e-4..2e-2, scaled_linear 0.00085..0.012).
std::vector<double> make_betas(Schedule schedule, int num_train_timesteps, double beta_start = NAN,
                               double beta_end = NAN);
std::vector<double> make_alphas_cumprod(const std::vector<double>& betas);
// steps_offset is added to "leading" timesteps; solver_grid divides "leading" / "linspace" into n + 1 points
// and drops the last (diffusers' multistep solvers).
std::vector<int64_t> make_timesteps(int num_inference_steps, int num_train_timesteps, Spacing spacing,
                                    int64_t steps_offset = 0, bool solver_grid = false);

// The scalars of one fused step. They are float because the reference multiplies fp32 tensors by Python
// floats, which torch casts to fp32 first; what each one multiplies depends on `kind` (see step_math.h).
struct StepCoefs {
    SamplerKind kind = SamplerKind::DDIM;
    Prediction prediction = Prediction::V;
    float alpha = 1.f, sigma = 0.f;   // sqrt(abar_t), sqrt(1 - abar_t): prediction -> (x0, eps)
    float inv_alpha = 1.f;            // 1.f / alpha: torch's CUDA division by a scalar multiplies by it
    bool clip = false;
    float clip_lo = -1.f, clip_hi = 1.f;
    float c_x0 = 0.f, c_x = 0.f, c_eps = 0.f;
    bool to_x0 = false;                // DPM-Solver++ final step: x_{t-1} = x0
    bool second_order = false;         // DPM-Solver++ with history: reads x0 of the previous step
    float r = 1.f, inv_r = 1.f, c_d1 = 0.f;
    bool needs_noise = false;          // DDPM / DDIM (eta > 0): the caller supplies one N(0, 1) draw
    float c_noise = 0.f;
    bool writes_history = false;       // DPM-Solver++: x0 is stored for the next step
};

// Schedule plus the state a multistep solver carries between steps; one per sampling run.
class Scheduler {
public:
    Scheduler(SamplerKind kind, Schedule schedule, Prediction prediction, Spacing spacing,
              int num_train_timesteps = 1000, double eta = 0.0, bool clip_sample = false, double clip_range = 1.0,
              double beta_start = NAN, double beta_end = NAN, int64_t steps_offset = 0,
              bool set_alpha_to_one = true, bool fixed_stride = false);

    void set_timesteps(int num_inference_steps);  // also resets the solver history
    void set_timesteps(const std::vector<int64_t>& timesteps);  // explicit, strictly descending
    void reset();
    // Coefficients of the step from timestep t (one of timesteps()) to the next one; advances the history.
    StepCoefs step_coefs(int64_t t);
    double abar(int64_t t) const;                 // t < 0: the clean sample, 1
    int64_t prev_timestep(int64_t t) const;

    const std::vector<double>& betas() const { return betas_; }
    const std::vector<double>& alphas_cumprod() const { return abar_; }
    const std::vector<int64_t>& timesteps() const { return timesteps_; }
    SamplerKind kind() const { return kind_; }
    Prediction prediction() const { return prediction_; }

private:
    size_t index_of(int64_t t) const;
    SamplerKind kind_;
    Prediction prediction_;
    Spacing spacing_;
    int num_train_timesteps_;
    double eta_, clip_range_;
    bool clip_;
    int64_t steps_offset_ = 0;
    double final_abar_ = 1.0;  // DDIM's abar after the last step
    bool fixed_stride_ = false;
    int64_t stride_ = 0;       // fixed_stride: t steps to t - N / n (diffusers' DDIM); 0: to the next timestep
    std::vector<double> betas_, abar_;
    std::vector<int64_t> timesteps_;
    bool has_history_ = false;
    double prev_lambda_ = 0.0;
};

// ---- the fused step -------------------------------------------------------------------------------------
// x_{t-1} = update(x_t, x0, eps, history, noise) with (x0, eps) from the guided prediction
// guided = uncond + s (cond - uncond), optionally rescaled (Lin et al. 2023), in one pass over the video.
// All buffers are contiguous with `numel` elements, `batch` samples of numel / batch elements each.
struct StepArgs {
    int64_t numel = 0, batch = 1;
    DType pred_dtype = DType::F32, x_dtype = DType::F32;   // cond/uncond; x and out
    const void* cond = nullptr;
    const void* uncond = nullptr;      // null: no guidance, the prediction is `cond`
    float guidance_scale = 1.f, guidance_rescale = 0.f;
    const void* x = nullptr;
    void* out = nullptr;               // may alias x
    float* history = nullptr;          // fp32 x0 of the previous step: read if second_order, written if writes_history
    const float* noise = nullptr;      // fp32, needed if coefs.needs_noise
    double* stats = nullptr;           // CUDA only, guidance rescale: 4 * batch doubles of scratch
    StepCoefs coefs;
};

// ---- MultiDiffusion ---------------------------------------------------------------------------------------
std::vector<int64_t> window_plan(int64_t num_frames, int64_t window, int64_t overlap);
// (starts.size() x min(window, num_frames)) weights, row-major, normalised so each frame's weights sum to one.
std::vector<double> window_weights(int64_t num_frames, const std::vector<int64_t>& starts, int64_t window,
                                   Weighting weighting);

// Per output frame, the windows that cover it: `cover` entries each (padded with window = -1).
struct BlendTable {
    int64_t num_frames = 0, window_len = 0, num_windows = 0, cover = 0;
    std::vector<int32_t> window, local;  // (num_frames x cover)
    std::vector<float> weight;           // (num_frames x cover), the fp32 weight the reference multiplies by
};
BlendTable blend_table(int64_t num_frames, int64_t window, int64_t overlap, Weighting weighting);

// out[r, f, p] = sum_k weight[f, k] * in[window[f, k], r, local[f, k], p], accumulated in fp32 in window
// order. in: (num_windows, rows, window_len, plane); out: (rows, num_frames, plane).
struct BlendArgs {
    const int32_t* window = nullptr;
    const int32_t* local = nullptr;
    const float* weight = nullptr;
    int64_t cover = 0, num_windows = 0, rows = 0, window_len = 0, num_frames = 0, plane = 0;
    DType in_dtype = DType::F32, out_dtype = DType::F32;
    const void* in = nullptr;
    void* out = nullptr;
};

void check(const StepArgs& args);    // throws std::invalid_argument naming the field
void check(const BlendArgs& args);

void fused_step_cpu(const StepArgs& args);
void blend_cpu(const BlendArgs& args);

#ifdef STUNET_WITH_CUDA
// Asynchronous on `stream` (a cudaStream_t); no host synchronisation, so both can be captured in a CUDA graph.
// They launch on the current device (cudaSetDevice): the buffers and `stream` must belong to it.
void fused_step_cuda(const StepArgs& args, void* stream);
void blend_cuda(const BlendArgs& args, void* stream);
#endif

// fp16 / bf16 <-> fp32 as torch converts on the CPU (round to nearest even, NaN -> quiet NaN), for tests.
uint16_t f32_to_f16_bits(float value);
float f16_bits_to_f32(uint16_t bits);
uint16_t f32_to_bf16_bits(float value);

std::string build_info();

}  // namespace stunet
