// pybind11 module stunet._C: the runtime on raw pointers (a tensor's data_ptr()) and a CUDA stream handle.
// Arguments are validated here and in check(); std::invalid_argument surfaces as ValueError. The typed,
// tensor-level API with device/dtype/contiguity checks is engine/runtime.py.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>

#include "runtime.h"

namespace py = pybind11;
using namespace stunet;

namespace {

template <class T>
T* ptr(uintptr_t address) { return reinterpret_cast<T*>(address); }

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
    throw std::invalid_argument("device must be 'cpu' or 'cuda', got '" + device + "'");
}

void fused_step(const StepCoefs& coefs, int64_t numel, int64_t batch, const std::string& pred_dtype, uintptr_t cond,
                uintptr_t uncond, float guidance_scale, float guidance_rescale, const std::string& x_dtype, uintptr_t x,
                uintptr_t out, uintptr_t history, uintptr_t noise, uintptr_t stats, const std::string& device,
                uintptr_t stream) {
    StepArgs a;
    a.numel = numel;
    a.batch = batch;
    a.pred_dtype = parse_dtype(pred_dtype);
    a.x_dtype = parse_dtype(x_dtype);
    a.cond = ptr<const void>(cond);
    a.uncond = ptr<const void>(uncond);
    a.guidance_scale = guidance_scale;
    a.guidance_rescale = guidance_rescale;
    a.x = ptr<const void>(x);
    a.out = ptr<void>(out);
    a.history = ptr<float>(history);
    a.noise = ptr<const float>(noise);
    a.stats = ptr<double>(stats);
    a.coefs = coefs;
    const bool cuda = on_cuda(device);
    py::gil_scoped_release release;
#ifdef STUNET_WITH_CUDA
    if (cuda) return fused_step_cuda(a, ptr<void>(stream));
#endif
    (void)cuda;
    (void)stream;
    fused_step_cpu(a);
}

void blend(uintptr_t window, uintptr_t local, uintptr_t weight, int64_t cover, int64_t num_windows, int64_t rows,
           int64_t window_len, int64_t num_frames, int64_t plane, const std::string& in_dtype, uintptr_t in,
           const std::string& out_dtype, uintptr_t out, const std::string& device, uintptr_t stream) {
    BlendArgs a;
    a.window = ptr<const int32_t>(window);
    a.local = ptr<const int32_t>(local);
    a.weight = ptr<const float>(weight);
    a.cover = cover;
    a.num_windows = num_windows;
    a.rows = rows;
    a.window_len = window_len;
    a.num_frames = num_frames;
    a.plane = plane;
    a.in_dtype = parse_dtype(in_dtype);
    a.out_dtype = parse_dtype(out_dtype);
    a.in = ptr<const void>(in);
    a.out = ptr<void>(out);
    const bool cuda = on_cuda(device);
    py::gil_scoped_release release;
#ifdef STUNET_WITH_CUDA
    if (cuda) return blend_cuda(a, ptr<void>(stream));
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
                         double clip_range) {
                 return Scheduler(parse_sampler(sampler), parse_schedule(schedule), parse_prediction(prediction),
                                  parse_spacing(spacing), num_train_timesteps, eta, clip_sample, clip_range);
             }),
             py::arg("sampler"), py::arg("schedule") = "cosine", py::arg("prediction") = "v",
             py::arg("spacing") = "leading", py::arg("num_train_timesteps") = 1000, py::arg("eta") = 0.0,
             py::arg("clip_sample") = false, py::arg("clip_range") = 1.0)
        .def("set_timesteps", &Scheduler::set_timesteps, py::arg("num_inference_steps"))
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
    m.def("make_betas", [](const std::string& s, int n) { return make_betas(parse_schedule(s), n); },
          py::arg("schedule"), py::arg("num_train_timesteps") = 1000);
    m.def("make_timesteps", [](int n, int N, const std::string& s) { return make_timesteps(n, N, parse_spacing(s)); },
          py::arg("num_inference_steps"), py::arg("num_train_timesteps"), py::arg("spacing"));

    m.def("fused_step", &fused_step, py::arg("coefs"), py::arg("numel"), py::arg("batch"), py::arg("pred_dtype"),
          py::arg("cond"), py::arg("uncond"), py::arg("guidance_scale"), py::arg("guidance_rescale"),
          py::arg("x_dtype"), py::arg("x"), py::arg("out"), py::arg("history"), py::arg("noise"), py::arg("stats"),
          py::arg("device"), py::arg("stream"));
    m.def("blend", &blend, py::arg("window"), py::arg("local"), py::arg("weight"), py::arg("cover"),
          py::arg("num_windows"), py::arg("rows"), py::arg("window_len"), py::arg("num_frames"), py::arg("plane"),
          py::arg("in_dtype"), py::arg("in"), py::arg("out_dtype"), py::arg("out"), py::arg("device"),
          py::arg("stream"));

    m.def("f32_to_f16_bits", [](uintptr_t src, uintptr_t dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) ptr<uint16_t>(dst)[i] = f32_to_f16_bits(ptr<const float>(src)[i]);
    });
    m.def("f16_bits_to_f32", [](uintptr_t src, uintptr_t dst, int64_t n) {
        for (int64_t i = 0; i < n; ++i) ptr<float>(dst)[i] = f16_bits_to_f32(ptr<const uint16_t>(src)[i]);
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
