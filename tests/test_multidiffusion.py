"""Temporal MultiDiffusion: window plans, weights, blending, and exactness for frame-wise models."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stunet.sampling.multidiffusion import blend, multidiffusion_predict, window_plan, window_weights
from stunet.sampling.samplers import DDIM, DPMSolverPP2M


def test_lumiere_plan_for_80_frames():
    starts = window_plan(80, 16, 2)
    assert starts == [0, 14, 28, 42, 56, 64]  # stride 14, last window clamped to end at frame 79
    assert starts[-1] + 16 == 80


def test_window_covering_the_clip_is_one_window():
    assert window_plan(16, 16, 2) == [0]
    assert window_plan(5, 16, 2) == [0]
    assert window_plan(1, 16, 2) == [0]


def test_overlap_must_be_smaller_than_window():
    with pytest.raises(ValueError, match=r"overlap \(16\) must be smaller than window \(16\)"):
        window_plan(80, 16, 16)
    with pytest.raises(ValueError, match="window must be a positive integer"):
        window_plan(80, 0, 0)
    with pytest.raises(ValueError, match="overlap must be a non-negative integer"):
        window_plan(80, 8, -1)


@settings(max_examples=200, deadline=None)
@given(T=st.integers(1, 200), window=st.integers(1, 40), data=st.data())
def test_plans_cover_every_frame_with_the_overlap(T, window, data):
    overlap = data.draw(st.integers(0, window - 1))
    starts = window_plan(T, window, overlap)
    length = min(window, T)
    assert starts[0] == 0 and starts[-1] + length == T
    assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:]))  # overlap at least `overlap`
    assert starts == sorted(set(starts))
    for weighting in ("uniform", "ramp"):
        w = window_weights(T, starts, window, weighting)
        total = torch.zeros(T, dtype=torch.float64)
        for s, wi in zip(starts, w):
            total[s:s + length] += wi
        torch.testing.assert_close(total, torch.ones(T, dtype=torch.float64))


def test_uniform_weights_average_the_covering_windows():
    starts = window_plan(10, 6, 2)  # [0, 4]
    w = window_weights(10, starts, 6)
    outs = [torch.full((1, 1, 6, 1, 1), 2.0), torch.full((1, 1, 6, 1, 1), 4.0)]
    y = blend(outs, starts, w, 10).flatten().tolist()
    assert y == [2, 2, 2, 2, 3, 3, 4, 4, 4, 4]


def _framewise(batch):  # a per-frame model: depends on each frame alone
    return torch.tanh(1.3 * batch[:, :3]) + batch[:, 3:].mean(dim=(1, 3, 4), keepdim=True)


@pytest.mark.parametrize("T,window,overlap,batch_size", [(80, 16, 2, 4), (17, 4, 1, 3), (1, 16, 2, 1),
                                                         (9, 4, 2, 2)])
def test_framewise_model_windowed_equals_unwindowed_exactly(T, window, overlap, batch_size):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, T, 3, 3, generator=g)
    windowed = multidiffusion_predict(_framewise, x, window, overlap, batch_size)
    whole = _framewise(x)
    # with at most two windows per frame (0.5 * a + 0.5 * a == a) the blend is bit-exact
    covering = max(sum(s <= f < s + min(window, T) for s in window_plan(T, window, overlap)) for f in range(T))
    if covering <= 2:
        assert torch.equal(windowed, whole)
    else:
        torch.testing.assert_close(windowed, whole, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sampler", [DDIM, DPMSolverPP2M])
def test_windowed_sampling_equals_unwindowed_sampling(sampler):
    """A whole denoising run: blending predictions then one global step == the unwindowed run."""
    g = torch.Generator().manual_seed(1)
    low = torch.randn(1, 3, 20, 4, 4, generator=g)
    runs = []
    for windowed in (True, False):
        s = sampler(prediction="eps")
        s.set_timesteps(6)
        x = torch.randn(1, 3, 20, 4, 4, generator=torch.Generator().manual_seed(2))
        for t in s.timesteps:
            inp = torch.cat([x, low], dim=1)
            pred = multidiffusion_predict(_framewise, inp, 8, 2, 2) if windowed else _framewise(inp)
            x = s.step(pred, t, x)
        runs.append(x)
    assert torch.equal(runs[0], runs[1])


def test_batching_windows_does_not_change_the_result():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 30, 2, 2, generator=g)
    calls = []

    def model(batch):
        calls.append(batch.shape[0])
        return _framewise(batch)

    ref = multidiffusion_predict(model, x, 8, 3, batch_size=1)
    n = len(calls)
    calls.clear()
    assert torch.equal(multidiffusion_predict(model, x, 8, 3, batch_size=4), ref)
    assert calls == [4] * (n // 4) + ([n % 4] if n % 4 else [])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        multidiffusion_predict(model, x, 8, 3, batch_size=0)
