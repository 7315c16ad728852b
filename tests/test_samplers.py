"""Samplers: schedules, timestep spacing, closed-form recovery of x0, and independent re-derivations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stunet import samplers
from stunet.sampling.samplers import DDIM, DDPM, DPMSolverPP2M, cfg_combine, make_betas, make_timesteps

N = 1000


def test_schedules_match_their_definitions():
    np.testing.assert_allclose(make_betas("linear")[[0, -1]].numpy(), [1e-4, 2e-2])
    sl = make_betas("scaled_linear").numpy()
    np.testing.assert_allclose(np.sqrt(sl[[0, -1]]), [0.00085 ** 0.5, 0.012 ** 0.5])
    cos = make_betas("cosine").numpy()
    f = lambda t: math.cos((t / N + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    np.testing.assert_allclose(np.cumprod(1 - cos)[:500], [f(i + 1) / f(0) for i in range(500)], rtol=1e-9)
    assert cos.max() == pytest.approx(0.999) and len(cos) == N
    with pytest.raises(ValueError, match="schedule must be one of"):
        make_betas("sigmoid")


def test_timestep_spacings():
    assert make_timesteps(10, N, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert make_timesteps(10, N, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert make_timesteps(4, N, "linspace").tolist() == [999, 666, 333, 0]
    for spacing in samplers.SPACINGS:
        for n in range(1, N + 1):  # every count: float stepping (arange) once gave n + 1 timesteps for n = 61
            ts = make_timesteps(n, N, spacing)
            assert ts.dtype == torch.int64 and len(ts) == n, (spacing, n)
            assert (ts[:-1] > ts[1:]).all() and 0 <= int(ts[-1]) and int(ts[0]) <= N - 1, (spacing, n)
    s = DDIM()
    s.set_timesteps(32)
    assert s.timesteps[0] == 31 * 31 and s.timesteps[-1] == 0


def oracle(sampler, x0):
    """A model that knows x0: it returns the exact eps or v consistent with the current sample."""
    def predict(x, t):
        a = sampler.abar(int(t))
        eps = (x.double() - math.sqrt(a) * x0) / math.sqrt(1 - a)
        out = eps if sampler.prediction == "eps" else math.sqrt(a) * eps - math.sqrt(1 - a) * x0
        return out.float()
    return predict


@pytest.mark.parametrize("cls,kwargs", [(DDIM, {}), (DDIM, {"eta": 1.0}), (DDPM, {}), (DPMSolverPP2M, {})],
                         ids=["ddim", "ddim-eta1", "ddpm", "dpmpp2m"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_true_noise_recovers_x0(cls, kwargs, prediction, schedule, spacing):
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 5, 5, generator=g, dtype=torch.float64) * 2 - 1
    s = cls(schedule=schedule, prediction=prediction, spacing=spacing, **kwargs)
    s.set_timesteps(12)
    t0 = int(s.timesteps[0])
    x = s.add_noise(x0.float(), torch.randn(x0.shape, generator=g), t0)
    model = oracle(s, x0)
    for t in s.timesteps:
        x = s.step(model(x, t), t, x, generator=g)
    torch.testing.assert_close(x.double(), x0, atol=2e-4, rtol=0)


def ddim_reference(x, x0_fn, ts, abar, eta, noises):
    """DDIM (Song et al. 2021): eta = 0 as an Euler step of the ODE in x / alpha (eq. 14), else eq. 12; float64."""
    for i, t in enumerate(ts):
        a = abar[t]
        a_next = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = x0_fn(x, t)
        eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
        if eta == 0:  # the probability-flow ODE step: x/alpha moves by d(sigma/alpha) * eps
            xbar = x / np.sqrt(a) + (np.sqrt(1 - a_next) / np.sqrt(a_next) - np.sqrt(1 - a) / np.sqrt(a)) * eps
            x = xbar * np.sqrt(a_next)
        else:
            sigma = eta * np.sqrt((1 - a_next) / (1 - a)) * np.sqrt(1 - a / a_next)
            x = np.sqrt(a_next) * x0 + np.sqrt(1 - a_next - sigma ** 2) * eps + sigma * noises[i]
    return x


def dpmpp2m_reference(x, x0_fn, ts, abar):
    """DPM-Solver++(2M), Lu et al. 2022 Algorithm 2, written from the paper with exponentials."""
    lam = lambda a: np.log(np.sqrt(a) / np.sqrt(1 - a))  # noqa: E731
    prev = None
    for i, t in enumerate(ts):
        x0 = x0_fn(x, t)
        if i + 1 == len(ts):
            return x0
        s, tn = abar[t], abar[ts[i + 1]]
        h = lam(tn) - lam(s)
        if prev is None:
            d = x0
        else:
            h_last = lam(s) - lam(abar[prev[1]])
            r = h_last / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * prev[0]
        x = np.sqrt(1 - tn) / np.sqrt(1 - s) * x - np.sqrt(tn) * (np.exp(-h) - 1) * d
        prev = (x0, t)
    return x


def ddpm_reference(x, x0_fn, ts, abar, noises):
    """Posterior mean and variance of q(x_s | x_t, x0) from Bayes' rule on two Gaussians."""
    for i, t in enumerate(ts):
        a = abar[t]
        a_s = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        x0 = x0_fn(x, t)
        if i + 1 == len(ts):  # the last step lands on the clean sample: the posterior is a point mass
            return x0
        alpha_ts = a / a_s  # x_t | x_s ~ N(sqrt(alpha_ts) x_s, (1 - alpha_ts))
        # precision-weighted combination of the prior N(sqrt(a_s) x0, 1 - a_s) and the likelihood
        prec = 1 / (1 - a_s) + alpha_ts / (1 - alpha_ts)
        mean = (np.sqrt(a_s) * x0 / (1 - a_s) + np.sqrt(alpha_ts) * x / (1 - alpha_ts)) / prec
        x = mean + np.sqrt(1 / prec) * noises[i]
    return x


def _x0_fn(x, t=None):  # a fixed nonlinear "model" in terms of x0 (so the test does not depend on the oracle)
    return np.tanh(0.7 * x) * 0.9


@pytest.mark.parametrize("name", ["ddim", "ddim-eta", "ddpm", "dpmpp2m"])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_sampler_matches_an_independent_derivation(name, prediction):
    steps = 10
    cls, kw = {"ddim": (DDIM, {}), "ddim-eta": (DDIM, {"eta": 0.6}), "ddpm": (DDPM, {}),
               "dpmpp2m": (DPMSolverPP2M, {})}[name]
    s = cls(schedule="cosine", prediction=prediction, spacing="trailing", **kw)
    s.set_timesteps(steps)
    ts = [int(t) for t in s.timesteps]
    abar = s.alphas_cumprod.numpy()
    g = torch.Generator().manual_seed(3)
    x_init = torch.randn(1, 3, 2, 4, 4, generator=g)
    # Noise the sampler will draw, reproduced from the same seed (the last DDPM step draws none).
    draws = steps - 1 if name == "ddpm" else steps
    g_ref = torch.Generator().manual_seed(4)
    noises = [torch.randn(x_init.shape, generator=g_ref).double().numpy() for _ in range(draws)] + [0]

    def model(x, t):
        a = abar[int(t)]
        x0 = _x0_fn(x.double().numpy())
        eps = (x.double().numpy() - np.sqrt(a) * x0) / np.sqrt(1 - a)
        out = eps if prediction == "eps" else np.sqrt(a) * eps - np.sqrt(1 - a) * x0
        return torch.from_numpy(out).float()

    x, gen = x_init.clone(), torch.Generator().manual_seed(4)
    for t in s.timesteps:
        x = s.step(model(x, t), t, x, generator=gen)
    x_np = x_init.double().numpy()
    if name.startswith("ddim"):
        ref = ddim_reference(x_np, _x0_fn, ts, abar, kw.get("eta", 0.0), noises)
    elif name == "ddpm":
        ref = ddpm_reference(x_np, _x0_fn, ts, abar, noises)
    else:
        ref = dpmpp2m_reference(x_np, _x0_fn, ts, abar)
    np.testing.assert_allclose(x.double().numpy(), ref, atol=1e-4, rtol=1e-4)


def test_same_seed_same_trajectory_and_dtype_kept():
    s = DDPM(prediction="eps")
    s.set_timesteps(5)
    outs = []
    for _ in range(2):
        x, g = torch.ones(1, 3, 2, 4, 4, dtype=torch.float16), torch.Generator().manual_seed(7)
        for t in s.timesteps:
            x = s.step(torch.zeros_like(x), t, x, generator=g)
        outs.append(x)
    assert outs[0].dtype == torch.float16 and torch.equal(outs[0], outs[1])


def test_clip_sample_bounds_x0():
    s = DDIM(prediction="eps", clip_sample=True)
    s.set_timesteps(3)
    x = torch.full((1, 1, 1, 2, 2), 50.0)
    for t in s.timesteps:
        x = s.step(torch.zeros_like(x), t, x)
    assert x.abs().max() <= 1.0


def test_cfg_combine_and_rescale():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 3, 2, 4, 4, generator=g), torch.randn(2, 3, 2, 4, 4, generator=g)
    torch.testing.assert_close(cfg_combine(cond, uncond, 1.0), cond)
    torch.testing.assert_close(cfg_combine(cond, uncond, 7.5), uncond + 7.5 * (cond - uncond))
    full = cfg_combine(cond, uncond, 7.5, guidance_rescale=1.0)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    half = cfg_combine(cond, uncond, 7.5, guidance_rescale=0.5)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * cfg_combine(cond, uncond, 7.5))


def test_sampler_errors():
    s = DDIM()
    with pytest.raises(RuntimeError, match="call set_timesteps"):
        s.step(torch.zeros(1), 10, torch.zeros(1))
    s.set_timesteps(4)
    with pytest.raises(ValueError, match="timestep 7 is not in this sampler's timesteps"):
        s.step(torch.zeros(1), 7, torch.zeros(1))
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(torch.zeros(2), int(s.timesteps[0]), torch.zeros(1))
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\], got 2.0"):
        DDIM(eta=2.0)
    for kwargs, message in [(dict(eta=None), "eta must be a number in"),
                            (dict(clip_range=None), "clip_range must be a positive number, got None"),
                            (dict(clip_range=float("inf")), "clip_range must be a positive number, got inf"),
                            (dict(clip_sample=1), "clip_sample must be a bool, got 1"),
                            (dict(schedule="linear", beta_start=""), "beta_start must be a number, got ''"),
                            # a table of 10**30 betas ran until memory ran out
                            (dict(num_train_timesteps=10 ** 30), r"num_train_timesteps must be an integer in \[2, "
                                                                 rf"100000\], got {10 ** 30}$"),
                            (dict(num_train_timesteps=1), "num_train_timesteps must be an integer in")]:
        with pytest.raises(ValueError, match=message):
            DDIM(**kwargs)
    numpy_scalars = DDIM(eta=np.float32(0.5), clip_range=np.float64(2))  # numbers too, kept as Python floats
    assert (numpy_scalars.eta, numpy_scalars.clip_range) == (0.5, 2.0) and type(numpy_scalars.eta) is float
    with pytest.raises(ValueError, match="prediction must be one of"):
        DDPM(prediction="x0")
    with pytest.raises(ValueError, match="spacing must be one of"):
        DDPM(spacing="karras")
    with pytest.raises(ValueError, match="sampler must be one of"):
        samplers.make_sampler("euler")
    assert isinstance(samplers.make_sampler("DPM-Solver++2M"), DPMSolverPP2M)
