// MultiDiffusion window plans, weights and the per-frame blend table (engine/multidiffusion.py).
#include <algorithm>
#include <stdexcept>
#include <string>

#include "runtime.h"

namespace stunet {

std::vector<int64_t> window_plan(int64_t num_frames, int64_t window, int64_t overlap) {
    if (num_frames < 1) throw std::invalid_argument("num_frames must be a positive integer, got " + std::to_string(num_frames));
    if (window < 1) throw std::invalid_argument("window must be a positive integer, got " + std::to_string(window));
    if (overlap < 0) throw std::invalid_argument("overlap must be a non-negative integer, got " + std::to_string(overlap));
    if (overlap >= window)
        throw std::invalid_argument("overlap (" + std::to_string(overlap) + ") must be smaller than window (" +
                                    std::to_string(window) + "): windows must advance");
    if (window >= num_frames) return {0};
    const int64_t stride = window - overlap;
    std::vector<int64_t> starts;
    for (int64_t s = 0; s <= num_frames - window; s += stride) starts.push_back(s);
    if (starts.back() + window < num_frames) starts.push_back(num_frames - window);  // last window clamped
    return starts;
}

std::vector<double> window_weights(int64_t num_frames, const std::vector<int64_t>& starts, int64_t window,
                                   Weighting weighting) {
    const int64_t length = std::min(window, num_frames);
    const size_t n = starts.size();
    std::vector<double> w(n * static_cast<size_t>(length));
    std::vector<double> total(static_cast<size_t>(num_frames), 0.0);
    for (size_t i = 0; i < n; ++i) {
        if (starts[i] < 0 || starts[i] + length > num_frames)
            throw std::invalid_argument("window start " + std::to_string(starts[i]) + " does not fit " +
                                        std::to_string(num_frames) + " frames");
        for (int64_t k = 0; k < length; ++k) {
            const double raw = weighting == Weighting::Uniform ? 1.0 : static_cast<double>(std::min(k + 1, length - k));
            w[i * length + k] = raw;
            total[starts[i] + k] += raw;
        }
    }
    for (int64_t f = 0; f < num_frames; ++f)
        if (total[f] == 0.0)
            throw std::invalid_argument("the windows do not cover frame " + std::to_string(f) + " of " +
                                        std::to_string(num_frames));
    for (size_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < length; ++k) w[i * length + k] /= total[starts[i] + k];
    return w;
}

Weighting parse_weighting(const std::string& name) {
    if (name == "uniform") return Weighting::Uniform;
    if (name == "ramp") return Weighting::Ramp;
    throw std::invalid_argument("weighting must be one of ('uniform', 'ramp'), got '" + name + "'");
}

BlendTable blend_table(int64_t num_frames, int64_t window, int64_t overlap, Weighting weighting) {
    const std::vector<int64_t> starts = window_plan(num_frames, window, overlap);
    const std::vector<double> w = window_weights(num_frames, starts, window, weighting);
    BlendTable t;
    t.num_frames = num_frames;
    t.window_len = std::min(window, num_frames);
    t.num_windows = static_cast<int64_t>(starts.size());
    std::vector<int64_t> count(static_cast<size_t>(num_frames), 0);
    for (int64_t s : starts)
        for (int64_t k = 0; k < t.window_len; ++k) ++count[s + k];
    t.cover = *std::max_element(count.begin(), count.end());
    const size_t cells = static_cast<size_t>(num_frames * t.cover);
    t.window.assign(cells, -1);
    t.local.assign(cells, 0);
    t.weight.assign(cells, 0.f);
    std::fill(count.begin(), count.end(), 0);
    for (size_t i = 0; i < starts.size(); ++i) {  // window order, as the reference accumulates
        for (int64_t k = 0; k < t.window_len; ++k) {
            const int64_t f = starts[i] + k, cell = f * t.cover + count[f]++;
            t.window[cell] = static_cast<int32_t>(i);
            t.local[cell] = static_cast<int32_t>(k);
            t.weight[cell] = static_cast<float>(w[i * t.window_len + k]);
        }
    }
    return t;
}

}  // namespace stunet
