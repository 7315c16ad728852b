// CUDA passes of the fused step and the blend: asynchronous on the caller's stream, no host synchronisation
// (CUDA-graph capturable), 16-byte vector accesses where the buffers allow. Built only with STUNET_CUDA=1.
//
// Bytes per element of the step: cond + uncond + x + out (2 bytes each in fp16 or bf16), plus 8 for the DPM-Solver++
// history (read + write fp32) and 4 for the noise of stochastic steps: 8 to 20 bytes, arithmetic negligible,
// so both passes are bound by HBM bandwidth. Compiled with --fmad=false (see step_math.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "runtime.h"
#include "step_math.h"

namespace stunet {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // elements per thread per iteration on the vector path: 16 bytes of fp16

template <DType D> struct Dev;
template <> struct Dev<DType::F32> {
    using T = float;
    static __device__ __forceinline__ float load(const T* p, int64_t i) { return p[i]; }
    static __device__ __forceinline__ void store(T* p, int64_t i, float v) { p[i] = v; }
    static __device__ __forceinline__ void load8(const T* p, int64_t i, float (&v)[kVec]) {
        const float4 a = *reinterpret_cast<const float4*>(p + i), b = *reinterpret_cast<const float4*>(p + i + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    }
    static __device__ __forceinline__ void store8(T* p, int64_t i, const float (&v)[kVec]) {
        *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(p + i + 4) = make_float4(v[4], v[5], v[6], v[7]);
    }
};
template <> struct Dev<DType::F16> {
    using T = __half;
    static __device__ __forceinline__ float load(const T* p, int64_t i) { return __half2float(p[i]); }
    static __device__ __forceinline__ void store(T* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
    static __device__ __forceinline__ void load8(const T* p, int64_t i, float (&v)[kVec]) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
        const __half2* h = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __half22float2(h[j]);
            v[2 * j] = f.x;
            v[2 * j + 1] = f.y;
        }
    }
    static __device__ __forceinline__ void store8(T* p, int64_t i, const float (&v)[kVec]) {
        uint4 raw;
        __half2* h = reinterpret_cast<__half2*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = __floats2half2_rn(v[2 * j], v[2 * j + 1]);
        *reinterpret_cast<uint4*>(p + i) = raw;
    }
};

template <> struct Dev<DType::BF16> {
    using T = __nv_bfloat16;
    static __device__ __forceinline__ float load(const T* p, int64_t i) { return __bfloat162float(p[i]); }
    static __device__ __forceinline__ void store(T* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
    static __device__ __forceinline__ void load8(const T* p, int64_t i, float (&v)[kVec]) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p + i);
        const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float2 f = __bfloat1622float2(h[j]);
            v[2 * j] = f.x;
            v[2 * j + 1] = f.y;
        }
    }
    static __device__ __forceinline__ void store8(T* p, int64_t i, const float (&v)[kVec]) {
        uint4 raw;
        __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) h[j] = __floats2bfloat162_rn(v[2 * j], v[2 * j + 1]);
        *reinterpret_cast<uint4*>(p + i) = raw;
    }
};

template <DType D, int N>
__device__ __forceinline__ void load_n(const typename Dev<D>::T* p, int64_t i, float (&v)[kVec]) {
    if constexpr (N == kVec) Dev<D>::load8(p, i, v);
    else v[0] = Dev<D>::load(p, i);
}
template <DType D, int N>
__device__ __forceinline__ void store_n(typename Dev<D>::T* p, int64_t i, const float (&v)[kVec]) {
    if constexpr (N == kVec) Dev<D>::store8(p, i, v);
    else Dev<D>::store(p, i, v[0]);
}

void check_launch(const char* what) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

int64_t blocks_for(int64_t items) {
    const int64_t b = (items + kThreads - 1) / kThreads;
    return b < 1 ? 1 : (b > (1 << 20) ? (1 << 20) : b);  // grid-stride beyond a million blocks
}

bool aligned16(const void* p) { return p == nullptr || (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Per-sample (sum, sum of squares) of cond and of the guided prediction, for guidance rescale.
template <DType P>
__global__ void rescale_stats_kernel(StepArgs a, int64_t per_sample) {
    using DP = Dev<P>;
    const auto* cond = static_cast<const typename DP::T*>(a.cond);
    const auto* uncond = static_cast<const typename DP::T*>(a.uncond);
    const int64_t b = blockIdx.y, base = b * per_sample;
    double s[4] = {0, 0, 0, 0};
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_sample;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const float c = DP::load(cond, base + i);
        const float g = detail::guide<P>(c, DP::load(uncond, base + i), true, a.guidance_scale);
        detail::accumulate_stats(s, c, g);
    }
    __shared__ double partial[4][kThreads / 32];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        double v = s[j];
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if ((threadIdx.x & 31) == 0) partial[j][threadIdx.x / 32] = v;
    }
    __syncthreads();
    if (threadIdx.x < 4) {
        double v = 0;
        for (int w = 0; w < kThreads / 32; ++w) v += partial[threadIdx.x][w];
        atomicAdd(a.stats + 4 * b + threadIdx.x, v);
    }
}

template <DType P, DType X, int N>
__global__ void step_kernel(StepArgs a, int64_t items, int64_t per_sample) {
    using DP = Dev<P>;
    using DX = Dev<X>;
    const auto* cond = static_cast<const typename DP::T*>(a.cond);
    const auto* uncond = static_cast<const typename DP::T*>(a.uncond);
    const auto* x = static_cast<const typename DX::T*>(a.x);
    auto* out = static_cast<typename DX::T*>(a.out);
    const StepCoefs& k = a.coefs;
    const bool has_u = uncond != nullptr, rescaled = has_u && a.guidance_rescale != 0.f;
    const float one_minus_r = static_cast<float>(1.0 - static_cast<double>(a.guidance_rescale));
    // Guidance rescale's per-sample factor (fp64 divisions and square roots, slow on GPUs with little fp64) is
    // computed when a thread meets a new sample, not per element: a few times per thread.
    int64_t factor_of = -1;
    float factor = 1.f;
    for (int64_t item = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; item < items;
         item += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t i = item * N;
        float c[kVec], u[kVec], xv[kVec], prev[kVec], z[kVec], res[kVec], x0[kVec];
        load_n<P, N>(cond, i, c);
        if (has_u) load_n<P, N>(uncond, i, u);
        load_n<X, N>(x, i, xv);
        if (k.second_order) load_n<DType::F32, N>(a.history, i, prev);
        if (k.needs_noise) load_n<DType::F32, N>(a.noise, i, z);
        int64_t sample = 0, next_sample_at = 0;  // element i + j's sample, and where the next one starts
        if (rescaled) {
            sample = i / per_sample;
            next_sample_at = (sample + 1) * per_sample;
        }
#pragma unroll
        for (int j = 0; j < N; ++j) {
            float g = detail::guide<P>(c[j], has_u ? u[j] : 0.f, has_u, a.guidance_scale);
            if (rescaled) {
                if (i + j == next_sample_at) {  // a vector of 8 may straddle samples of fewer than 8 elements
                    ++sample;
                    next_sample_at += per_sample;
                }
                if (sample != factor_of) {
                    factor = detail::rescale_factor(a.stats + 4 * sample, per_sample);
                    factor_of = sample;
                }
                g = detail::rescale<P>(g, factor, a.guidance_rescale, one_minus_r);
            }
            res[j] = detail::update(k, g, xv[j], k.second_order ? prev[j] : 0.f, k.needs_noise ? z[j] : 0.f, &x0[j]);
        }
        if (k.writes_history) store_n<DType::F32, N>(a.history, i, x0);
        store_n<X, N>(out, i, res);
    }
}

template <DType I, DType O, int N>
__global__ void blend_kernel(BlendArgs a) {
    using DI = Dev<I>;
    using DO = Dev<O>;
    const auto* in = static_cast<const typename DI::T*>(a.in);
    auto* out = static_cast<typename DO::T*>(a.out);
    const int64_t rf = blockIdx.x, r = rf / a.num_frames, f = rf % a.num_frames;
    for (int64_t p = (blockIdx.y * static_cast<int64_t>(blockDim.x) + threadIdx.x) * N; p < a.plane;
         p += static_cast<int64_t>(gridDim.y) * blockDim.x * N) {
        float acc[kVec] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int64_t c = 0; c < a.cover; ++c) {
            const int32_t w = a.window[f * a.cover + c];
            if (w < 0) break;
            const float wt = a.weight[f * a.cover + c];
            const int64_t src = ((w * a.rows + r) * a.window_len + a.local[f * a.cover + c]) * a.plane + p;
            float v[kVec];
            load_n<I, N>(in, src, v);
#pragma unroll
            for (int j = 0; j < N; ++j) acc[j] = __fadd_rn(acc[j], __fmul_rn(v[j], wt));
        }
        store_n<O, N>(out, rf * a.plane + p, acc);
    }
}

template <DType P, DType X>
void launch_step(const StepArgs& a, cudaStream_t stream) {
    const int64_t per_sample = a.numel / a.batch;
    if (a.uncond && a.guidance_rescale != 0.f) {
        if (!a.stats) throw std::invalid_argument("stats must be given for guidance_rescale on CUDA (4 * batch doubles)");
        if (cudaMemsetAsync(a.stats, 0, 4 * a.batch * sizeof(double), stream) != cudaSuccess) check_launch("memset");
        const int64_t chunks = (per_sample + kThreads * 16 - 1) / (kThreads * 16);
        const dim3 grid(static_cast<unsigned>(chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks)),
                        static_cast<unsigned>(a.batch));
        rescale_stats_kernel<P><<<grid, kThreads, 0, stream>>>(a, per_sample);
        check_launch("rescale_stats_kernel");
    }
    const bool vec = a.numel % kVec == 0 && aligned16(a.cond) && aligned16(a.uncond) && aligned16(a.x) &&
                     aligned16(a.out) && aligned16(a.history) && aligned16(a.noise);
    if (vec) {
        const int64_t items = a.numel / kVec;
        step_kernel<P, X, kVec><<<blocks_for(items), kThreads, 0, stream>>>(a, items, per_sample);
    } else {
        step_kernel<P, X, 1><<<blocks_for(a.numel), kThreads, 0, stream>>>(a, a.numel, per_sample);
    }
    check_launch("step_kernel");
}

template <DType I, DType O>
void launch_blend(const BlendArgs& a, cudaStream_t stream) {
    const bool vec = a.plane % kVec == 0 && aligned16(a.in) && aligned16(a.out);
    const int n = vec ? kVec : 1;
    const int64_t chunks = (a.plane + kThreads * n - 1) / (kThreads * n);
    const dim3 grid(static_cast<unsigned>(a.rows * a.num_frames),
                    static_cast<unsigned>(chunks < 1 ? 1 : (chunks > 65535 ? 65535 : chunks)));
    if (vec) blend_kernel<I, O, kVec><<<grid, kThreads, 0, stream>>>(a);
    else blend_kernel<I, O, 1><<<grid, kThreads, 0, stream>>>(a);
    check_launch("blend_kernel");
}

}  // namespace

void fused_step_cuda(const StepArgs& a, void* stream) {
    check(a);
    if (a.numel == 0) return;
    auto s = static_cast<cudaStream_t>(stream);
    detail::with_dtype(a.pred_dtype, [&](auto p) {
        detail::with_dtype(a.x_dtype, [&](auto x) { launch_step<decltype(p)::value, decltype(x)::value>(a, s); });
    });
}

void blend_cuda(const BlendArgs& a, void* stream) {
    check(a);
    if (a.rows * a.plane == 0) return;
    if (a.rows * a.num_frames > 0x7fffffff) throw std::invalid_argument("rows * num_frames must be < 2^31");
    auto s = static_cast<cudaStream_t>(stream);
    detail::with_dtype(a.in_dtype, [&](auto i) {
        detail::with_dtype(a.out_dtype, [&](auto o) { launch_blend<decltype(i)::value, decltype(o)::value>(a, s); });
    });
}

}  // namespace stunet
