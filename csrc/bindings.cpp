// pybind11 module stunet._C: the runtime on buffers and a CUDA stream handle.
//
// A buffer is (address, numel, dtype, device), built from a contiguous tensor by engine/sampling/runtime.py
// (address = data_ptr()). Every buffer is checked here against what the pass will read or write (element
// count, dtype, device) before any pointer is dereferenced, so a caller's mistake is a ValueError naming the
// argument, never an out-of-bounds access; std::invalid_argument surfaces as ValueError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>

#include "runtime.h"

namespace py = pybind11;
using namespace stunet;

namespace {

using BufferArg = std::tuple<uintptr_t, int64_t, std::string, std::string>;  // (address, numel, dtype, device)

struct Buffer {
    uintptr_t address = 0;
    int64_t numel = 0;
    std::string dtype, device;
    template <class T>
    T* as() const { return reinterpret_cast<T*>(address); }
};

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

// The buffer `name`, checked: `numel` elements (at least `numel` when `at_least`), one of `dtypes`, on `device`
// (empty: any; the first buffer's device is then what the others must match).
Buffer buffer(const char* name, const BufferArg& arg, int64_t numel, std::initializer_list<const char*> dtypes,
              const std::string& device, bool at_least = false) {
    Buffer b{std::get<0>(arg), std::get<1>(arg), std::get<2>(arg), std::get<3>(arg)};
    if (b.numel < 0) bad(std::string(name) + " has a negative element count");
    if (at_least ? b.numel < numel : b.numel != numel)
        bad(std::string(name) + " has " + std::to_string(b.numel) + " elements, the pass needs " +
            (at_least ? "at least " : "") + std::to_string(numel));
    bool ok = false;
    std::string accepted;
    for (const char* d : dtypes) {
        ok = ok || b.dtype == d;
        accepted += (accepted.empty() ? "" : ", ") + std::string(d);
    }
    if (!ok) bad(std::string(name) + " has dtype " + b.dtype + "; accepted: " + accepted);
    if (!device.empty() && b.device != device)
        bad(std::string(name) + " is on " + b.device + " but the other buffers are on " + device);
    if (b.numel > 0 && b.address == 0) bad(std::string(name) + " has a null address");
    return b;
}

std::optional<Buffer> optional_buffer(const char* name, const std::optional<BufferArg>& arg, bool needed,
                                      const char* why, int64_t numel, std::initializer_list<const char*> dtypes,
                                      const std::string& device, bool at_least = false) {
    if (!arg) {
        if (needed) bad(std::string(name) + " must be given: " + why);
        return std::nullopt;
    }
    return buffer(name, *arg, numel, dtypes, device, at_least);
}

bool on_cuda(const std::string& device) {
    if (device == "cpu") return false;
    if (device == "cuda") {
#ifdef STUNET_WITH_CUDA
        return true;
#else
        throw std::runtime_error("stunet._C was built without CUDA; reinstall with STUNET_CUDA=1 (and nvcc on PATH) "
                                 "to run the runtime on GPU tensors");
#endif
    }
    bad("buffers must be on 'cpu' or 'cuda', got '" + device + "'");
}

void fused_step(const StepCoefs& coefs, int64_t batch, const BufferArg& cond_arg,
                const std::optional<BufferArg>& uncond_arg, float guidance_scale, float guidance_rescale,
                const BufferArg& x_arg, const BufferArg& out_arg, const std::optional<BufferArg>& history_arg,
                const std::optional<BufferArg>& noise_arg, const std::optional<BufferArg>& stats_arg,
                uintptr_t stream) {
    const Buffer x = buffer("x", x_arg, std::get<1>(x_arg), {"float32", "float16", "bfloat16"}, "");
    const int64_t n = x.numel;
    const std::string& dev = x.device;
    const bool cuda = on_cuda(dev);
    const Buffer cond = buffer("cond", cond_arg, n, {"float32", "float16", "bfloat16"}, dev);
    const auto uncond = optional_buffer("uncond", uncond_arg, false, "", n, {cond.dtype.c_str()}, dev);
    const Buffer out = buffer("out", out_arg, n, {x.dtype.c_str()}, dev);
    const auto history = optional_buffer("history", history_arg, coefs.second_order || coefs.writes_history,
                                         "this DPM-Solver++ step reads or writes the previous x0", n, {"float32"}, dev);
    const auto noise = optional_buffer("noise", noise_arg, coefs.needs_noise,
                                       "this step of a stochastic sampler adds noise", n, {"float32"}, dev);
    const bool rescaled = uncond && guidance_rescale != 0.f;
    const auto stats = optional_buffer("stats", stats_arg, cuda && rescaled,
                                       "guidance rescale on CUDA reduces into 4 * batch doubles of scratch",
                                       4 * std::max<int64_t>(batch, 1), {"float64"}, dev, true);
    StepArgs a;
    a.numel = n;
    a.batch = batch;
    a.pred_dtype = parse_dtype(cond.dtype);
    a.x_dtype = parse_dtype(x.dtype);
    a.cond = cond.as<const void>();
    a.uncond = uncond ? uncond->as<const void>() : nullptr;
    a.guidance_scale = guidance_scale;
    a.guidance_rescale = guidance_rescale;
    a.x = x.as<const void>();
    a.out = out.as<void>();
    a.history = history ? history->as<float>() : nullptr;
    a.noise = noise ? noise->as<const float>() : nullptr;
    a.stats = stats ? stats->as<double>() : nullptr;
    a.coefs = coefs;
    check(a);
    py::gil_scoped_release release;
#ifdef STUNET_WITH_CUDA
    if (cuda) return fused_step_cuda(a, reinterpret_cast<void*>(stream));
#endif
    (void)cuda;
    (void)stream;
    fused_step_cpu(a);
}

void blend(const BufferArg& window_arg, const BufferArg& local_arg, const BufferArg& weight_arg, int64_t cover,
           int64_t num_windows, int64_t rows, int64_t window_len, int64_t num_frames, int64_t plane,
           const BufferArg& in_arg, const BufferArg& out_arg, uintptr_t stream) {
    if (cover < 1 || num_windows < 1 || rows < 0 || window_len < 1 || num_frames < 1 || plane < 0)
        bad("the blend geometry must be positive (cover, num_windows, window_len, num_frames) and non-negative "
            "(rows, plane)");
    const Buffer in = buffer("in", in_arg, num_windows * rows * window_len * plane, {"float32", "float16", "bfloat16"}, "");
    const std::string& dev = in.device;
    const bool cuda = on_cuda(dev);
    const Buffer out = buffer("out", out_arg, rows * num_frames * plane, {"float32", "float16", "bfloat16"}, dev);
    const Buffer window = buffer("window", window_arg, num_frames * cover, {"int32"}, dev);
    const Buffer local = buffer("local", local_arg, num_frames * cover, {"int32"}, dev);
    const Buffer weight = buffer("weight", weight_arg, num_frames * cover, {"float32"}, dev);
    BlendArgs a;
    a.window = window.as<const int32_t>();
    a.local = local.as<const int32_t>();
    a.weight = weight.as<const float>();
    a.cover = cover;
    a.num_windows = num_windows;
    a.rows = rows;
    a.window_len = window_len;
    a.num_frames = num_frames;
    a.plane = plane;
    a.in_dtype = parse_dtype(in.dtype);
    a.out_dtype = parse_dtype(out.dtype);
    a.in = in.as<const void>();
    a.out = out.as<void>();
    check(a);
    py::gil_scoped_release release;
#ifdef STUNET_WITH_CUDA
    if (cuda) return blend_cuda(a, reinterpret_cast<void*>(stream));
#endif
    (void)cuda;
    (void)stream;
    blend_cpu(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "stunet C++ denoising runtime: schedule tables, fused sampler step, MultiDiffusion blending";

    py::class_<StepCoefs>(m, "StepCoefs")
        .def_readonly("alpha", &StepCoefs::alpha)
        .def_readonly("sigma", &StepCoefs::sigma)
        .def_readonly("c_x0", &StepCoefs::c_x0)
        .def_readonly("c_x", &StepCoefs::c_x)
        .def_readonly("c_eps", &StepCoefs::c_eps)
        .def_readonly("to_x0", &StepCoefs::to_x0)
        .def_readonly("second_order", &StepCoefs::second_order)
        .def_readonly("r", &StepCoefs::r)
        .def_readonly("c_d1", &StepCoefs::c_d1)
        .def_readonly("needs_noise", &StepCoefs::needs_noise)
        .def_readonly("c_noise", &StepCoefs::c_noise)
        .def_readonly("writes_history", &StepCoefs::writes_history);

    py::class_<Scheduler>(m, "Scheduler")
        .def(py::init([](const std::string& sampler, const std::string& schedule, const std::string& prediction,
                         const std::string& spacing, int num_train_timesteps, double eta, bool clip_sample,
                         double clip_range, std::optional<double> beta_start, std::optional<double> beta_end,
                         int64_t steps_offset, bool set_alpha_to_one, bool fixed_stride) {
                 return Scheduler(parse_sampler(sampler), parse_schedule(schedule), parse_prediction(prediction),
                                  parse_spacing(spacing), num_train_timesteps, eta, clip_sample, clip_range,
                                  beta_start.value_or(NAN), beta_end.value_or(NAN), steps_offset, set_alpha_to_one,
                                  fixed_stride);
             }),
             py::arg("sampler"), py::arg("schedule") = "cosine", py::arg("prediction") = "v",
             py::arg("spacing") = "leading", py::arg("num_train_timesteps") = 1000, py::arg("eta") = 0.0,
             py::arg("clip_sample") = false, py::arg("clip_range") = 1.0, py::arg("beta_start") = py::none(),
             py::arg("beta_end") = py::none(), py::arg("steps_offset") = 0, py::arg("set_alpha_to_one") = true,
             py::arg("fixed_stride") = false)
        .def("set_timesteps", py::overload_cast<int>(&Scheduler::set_timesteps), py::arg("num_inference_steps"))
        .def("set_explicit_timesteps", py::overload_cast<const std::vector<int64_t>&>(&Scheduler::set_timesteps),
             py::arg("timesteps"))
        .def("reset", &Scheduler::reset)
        .def("step_coefs", &Scheduler::step_coefs, py::arg("t"),
             "Coefficients of the step from t to the next timestep; advances the solver history.")
        .def("abar", &Scheduler::abar, py::arg("t"))
        .def("prev_timestep", &Scheduler::prev_timestep, py::arg("t"))
        .def_property_readonly("timesteps", &Scheduler::timesteps)
        .def_property_readonly("betas", &Scheduler::betas)
        .def_property_readonly("alphas_cumprod", &Scheduler::alphas_cumprod);

    py::class_<BlendTable>(m, "BlendTable")
        .def(py::init([](int64_t num_frames, int64_t window, int64_t overlap, const std::string& weighting) {
                 return blend_table(num_frames, window, overlap, parse_weighting(weighting));
             }),
             py::arg("num_frames"), py::arg("window"), py::arg("overlap"), py::arg("weighting") = "uniform")
        .def_readonly("num_frames", &BlendTable::num_frames)
        .def_readonly("window_len", &BlendTable::window_len)
        .def_readonly("num_windows", &BlendTable::num_windows)
        .def_readonly("cover", &BlendTable::cover)
        .def_readonly("window", &BlendTable::window)
        .def_readonly("local", &BlendTable::local)
        .def_readonly("weight", &BlendTable::weight);

    m.def("window_plan", &window_plan, py::arg("num_frames"), py::arg("window"), py::arg("overlap"));
    m.def("window_weights",
          [](int64_t num_frames, const std::vector<int64_t>& starts, int64_t window, const std::string& weighting) {
              const std::vector<double> flat = window_weights(num_frames, starts, window, parse_weighting(weighting));
              const size_t length = starts.empty() ? 0 : flat.size() / starts.size();
              std::vector<std::vector<double>> rows;
              for (size_t i = 0; i < starts.size(); ++i)
                  rows.emplace_back(flat.begin() + i * length, flat.begin() + (i + 1) * length);
              return rows;
          },
          py::arg("num_frames"), py::arg("starts"), py::arg("window"), py::arg("weighting") = "uniform");
    m.def("make_betas",
          [](const std::string& s, int n, std::optional<double> lo, std::optional<double> hi) {
              return make_betas(parse_schedule(s), n, lo.value_or(NAN), hi.value_or(NAN));
          },
          py::arg("schedule"), py::arg("num_train_timesteps") = 1000, py::arg("beta_start") = py::none(),
          py::arg("beta_end") = py::none());
    m.def("make_timesteps",
          [](int n, int N, const std::string& s, int64_t offset, bool solver_grid) {
              return make_timesteps(n, N, parse_spacing(s), offset, solver_grid);
          },
          py::arg("num_inference_steps"), py::arg("num_train_timesteps"), py::arg("spacing"),
          py::arg("steps_offset") = 0, py::arg("solver_grid") = false);

    m.def("fused_step", &fused_step, py::arg("coefs"), py::arg("batch"), py::arg("cond"), py::arg("uncond"),
          py::arg("guidance_scale"), py::arg("guidance_rescale"), py::arg("x"), py::arg("out"), py::arg("history"),
          py::arg("noise"), py::arg("stats"), py::arg("stream"),
          "One fused sampler step. Buffers are (address, numel, dtype, device) tuples; optional ones may be None.");
    m.def("blend", &blend, py::arg("window"), py::arg("local"), py::arg("weight"), py::arg("cover"),
          py::arg("num_windows"), py::arg("rows"), py::arg("window_len"), py::arg("num_frames"), py::arg("plane"),
          py::arg("in"), py::arg("out"), py::arg("stream"),
          "MultiDiffusion blend of (num_windows, rows, window_len, plane) into (rows, num_frames, plane).");

    // fp16 <-> fp32 conversions on CPU buffers, for tests against torch's.
    m.def("f32_to_f16_bits", [](const BufferArg& src_arg, const BufferArg& dst_arg) {
        const Buffer src = buffer("src", src_arg, std::get<1>(src_arg), {"float32"}, "cpu");
        const Buffer dst = buffer("dst", dst_arg, src.numel, {"int16", "float16"}, "cpu");
        for (int64_t i = 0; i < src.numel; ++i) dst.as<uint16_t>()[i] = f32_to_f16_bits(src.as<const float>()[i]);
    });
    m.def("f32_to_bf16_bits", [](const BufferArg& src_arg, const BufferArg& dst_arg) {
        const Buffer src = buffer("src", src_arg, std::get<1>(src_arg), {"float32"}, "cpu");
        const Buffer dst = buffer("dst", dst_arg, src.numel, {"int16", "bfloat16"}, "cpu");
        for (int64_t i = 0; i < src.numel; ++i) dst.as<uint16_t>()[i] = f32_to_bf16_bits(src.as<const float>()[i]);
    });
    m.def("f16_bits_to_f32", [](const BufferArg& src_arg, const BufferArg& dst_arg) {
        const Buffer src = buffer("src", src_arg, std::get<1>(src_arg), {"int16", "float16"}, "cpu");
        const Buffer dst = buffer("dst", dst_arg, src.numel, {"float32"}, "cpu");
        for (int64_t i = 0; i < src.numel; ++i) dst.as<float>()[i] = f16_bits_to_f32(src.as<const uint16_t>()[i]);
    });
    m.def("has_cuda", []() {
#ifdef STUNET_WITH_CUDA
        return true;
#else
        return false;
#endif
    });
    m.def("build_info", &build_info);
}
