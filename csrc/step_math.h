// Per-element math of the fused step and the blend, shared by the CPU loops and the CUDA kernels.
//
// The operation order is the reference's (engine/sampling/samplers.py): one fp32 rounding per torch op,
// prediction tensors in fp16 or bf16 rounded back to their dtype after every op of the guidance combine
// (torch computes 16-bit ops in fp32 and rounds each result). Compiled without contracted multiply-adds (-ffp-contract=off, nvcc --fmad=false):
// a fused a*b+c would differ from torch's separate mul and add in the last bit.
#pragma once

#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "runtime.h"

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define STUNET_HD __host__ __device__ __forceinline__
#else
#define STUNET_HD inline
#endif

namespace stunet {
namespace detail {

// ---- fp16 on the host (software, bit-exact with torch's conversion) ------------------------------------------
// Branch-free selects so loops over them vectorise; both use the FPU's round-to-nearest-even for the
// subnormal range (adding 0.5f aligns a value below 2^-14 to units of 2^-24), which assumes the default
// rounding mode without flush-to-zero, as torch runs.
inline uint32_t bits_of(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return b;
}
inline float float_of(uint32_t b) {
    float v;
    std::memcpy(&v, &b, 4);
    return v;
}

inline uint16_t f32_to_f16(float value) {
    const uint32_t x = bits_of(value);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t ax = x & 0x7fffffffu;
    // Normal halves: rebias the exponent (127 -> 15) and round the 13 dropped bits to nearest even; a carry
    // into the exponent (up to inf at 65520) is the correct result.
    const uint32_t normal = (ax + 0xc8000fffu + ((ax >> 13) & 1u)) >> 13;
    const uint32_t subnormal = bits_of(float_of(ax) + 0.5f) - 0x3f000000u;
    const uint32_t special = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN -> quiet NaN; inf and overflow
    const uint32_t magnitude = ax >= 0x47800000u ? special : (ax < 0x38800000u ? subnormal : normal);
    return static_cast<uint16_t>(sign | magnitude);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t shifted = static_cast<uint32_t>(h & 0x7fffu) << 13;
    const uint32_t e = h & 0x7c00u;
    // Normal: add 112 to the exponent. Subnormal and zero: the shifted bits are a float denormal m * 2^-136,
    // times 2^112 is m * 2^-24 exactly. Inf and NaN: force the exponent to all ones.
    const uint32_t normal = shifted + 0x38000000u;
    const uint32_t subnormal = bits_of(float_of(shifted) * 5.192296858534828e33f);  // 2^112
    const uint32_t special = shifted | 0x7f800000u;
    return float_of(sign | (e == 0x7c00u ? special : (e == 0 ? subnormal : normal)));
}

// bf16: the upper half of an fp32, rounded to nearest even (NaN -> 0x7fc0), as torch's c10::BFloat16.
inline uint16_t f32_to_bf16(float value) {
    const uint32_t x = bits_of(value);
    const uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

inline float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Rounds an fp32 value to the storage type of a tensor (identity for fp32).
template <DType D> struct Round;
template <> struct Round<DType::F32> {
    static STUNET_HD float apply(float v) { return v; }
};
template <> struct Round<DType::F16> {
    static STUNET_HD float apply(float v) {
#ifdef __CUDA_ARCH__
        return __half2float(__float2half_rn(v));
#else
        return f16_to_f32(f32_to_f16(v));
#endif
    }
};
template <> struct Round<DType::BF16> {
    static STUNET_HD float apply(float v) {
#ifdef __CUDA_ARCH__
        return __bfloat162float(__float2bfloat16_rn(v));
#else
        return bf16_to_f32(f32_to_bf16(v));
#endif
    }
};

// Calls f(std::integral_constant<DType, d>{}) for the run-time dtype d: one instantiation per dtype.
template <class F>
void with_dtype(DType d, F&& f) {
    switch (d) {
        case DType::F32: return f(std::integral_constant<DType, DType::F32>{});
        case DType::F16: return f(std::integral_constant<DType, DType::F16>{});
        case DType::BF16: return f(std::integral_constant<DType, DType::BF16>{});
    }
}

// Guidance as the reference's cfg_combine: ``uncond + s * (cond - uncond)`` in the prediction's dtype, then
// optionally ``r * (g * f) + (1 - r) * g`` in fp32 with f = std(cond) / std(guided), rounded to the dtype.
template <DType P>
STUNET_HD float guide(float c, float u, bool has_uncond, float scale) {
    if (!has_uncond) return c;
    const float d = Round<P>::apply(c - u);
    const float m = Round<P>::apply(scale * d);
    return Round<P>::apply(u + m);
}

template <DType P>
STUNET_HD float rescale(float g, float factor, float r, float one_minus_r) {
    const float rescaled = g * factor;
    return Round<P>::apply(r * rescaled + one_minus_r * g);
}

// One element of the sampler update from the (guided) prediction `g`, the sample `x`, the previous step's x0
// `prev` and the noise `z`; returns x_{t-1} in fp32 and x0 through `x0_out`. Sampler and prediction are
// template arguments so the CPU loops specialise (and vectorise); `update` dispatches at run time.
template <SamplerKind K, Prediction PR>
STUNET_HD float update_as(const StepCoefs& k, float g, float x, float prev, float z, float* x0_out) {
    float x0, eps;
    if constexpr (PR == Prediction::Eps) {
        eps = g;
        const float se = k.sigma * eps;
#ifdef __CUDA_ARCH__
        x0 = (x - se) * k.inv_alpha;  // as torch's CUDA kernel for tensor / scalar
#else
        x0 = (x - se) / k.alpha;
#endif
    } else {
        const float ax = k.alpha * x, sg = k.sigma * g;
        x0 = ax - sg;
        const float ag = k.alpha * g, sx = k.sigma * x;
        eps = ag + sx;
    }
    if (k.clip) x0 = x0 < k.clip_lo ? k.clip_lo : (x0 > k.clip_hi ? k.clip_hi : x0);  // NaN passes, as clamp
    *x0_out = x0;
    float xp;
    if constexpr (K == SamplerKind::DPMPP2M) {
        if (k.to_x0) return x0;
        const float a = k.c_x * x, b = k.c_x0 * x0;
        xp = a - b;
        if (k.second_order) {
#ifdef __CUDA_ARCH__
            const float d1 = (x0 - prev) * k.inv_r;
#else
            const float d1 = (x0 - prev) / k.r;
#endif
            const float c = k.c_d1 * d1;
            xp = xp - c;
        }
        return xp;
    } else {
        if constexpr (K == SamplerKind::DDIM) {
            const float a = k.c_x0 * x0, b = k.c_eps * eps;
            xp = a + b;
        } else {
            const float a = k.c_x0 * x0, b = k.c_x * x;
            xp = a + b;
        }
        (void)prev;
        if (k.needs_noise) {
            const float n = k.c_noise * z;
            xp = xp + n;
        }
        return xp;
    }
}

STUNET_HD float update(const StepCoefs& k, float g, float x, float prev, float z, float* x0_out) {
    const bool eps = k.prediction == Prediction::Eps;
    switch (k.kind) {
        case SamplerKind::DDIM:
            return eps ? update_as<SamplerKind::DDIM, Prediction::Eps>(k, g, x, prev, z, x0_out)
                       : update_as<SamplerKind::DDIM, Prediction::V>(k, g, x, prev, z, x0_out);
        case SamplerKind::DDPM:
            return eps ? update_as<SamplerKind::DDPM, Prediction::Eps>(k, g, x, prev, z, x0_out)
                       : update_as<SamplerKind::DDPM, Prediction::V>(k, g, x, prev, z, x0_out);
        default:
            return eps ? update_as<SamplerKind::DPMPP2M, Prediction::Eps>(k, g, x, prev, z, x0_out)
                       : update_as<SamplerKind::DPMPP2M, Prediction::V>(k, g, x, prev, z, x0_out);
    }
}

// Adds one element to a sample's (sum, sum of squares) of cond and of the guided prediction, in double.
STUNET_HD void accumulate_stats(double* s, float c, float g) {
    s[0] += c;
    s[1] += static_cast<double>(c) * c;
    s[2] += g;
    s[3] += static_cast<double>(g) * g;
}

// Per-sample rescale factor from the (sum, sum of squares) of cond and guided: float(std_c) / float(std_g),
// unbiased (n - 1) as torch.std.
STUNET_HD float rescale_factor(const double* s, int64_t n) {
    const double dn = static_cast<double>(n);
    double vc = (s[1] - s[0] * s[0] / dn) / (dn - 1.0);
    double vg = (s[3] - s[2] * s[2] / dn) / (dn - 1.0);
    vc = vc > 0.0 ? vc : 0.0;
    vg = vg > 0.0 ? vg : 0.0;
    return static_cast<float>(sqrt(vc)) / static_cast<float>(sqrt(vg));
}

}  // namespace detail
}  // namespace stunet
