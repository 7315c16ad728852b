"""The C++ runtime (stunet._C) against the Python reference: tables, fused step, window plans and blends.

On the CPU the runtime repeats the reference's operation order, so results are compared bit for bit
(``torch.equal``); the one exception is guidance rescale, whose per-sample std is reduced in another order
(bound: 1e-6 relative in fp32, one fp16 ulp in fp16). GPU tests compare the CUDA passes the same way.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import assert_close

from stunet.pipeline import SSROptions
from stunet.sampling import runtime
from stunet.sampling.multidiffusion import blend, window_plan, window_weights
from stunet.sampling.samplers import (DDIM, SAMPLERS, SCHEDULES, SPACINGS, make_betas, make_sampler,
                                      make_timesteps)

_C = pytest.importorskip("stunet._C", reason="the C++ runtime is not built")
CSRC = Path(__file__).resolve().parent.parent / "csrc"


# -- tables ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_tables_bit_identical(schedule):
    ref = make_sampler("ddim", schedule=schedule)
    sched = _C.Scheduler("ddim", schedule)
    assert sched.betas == make_betas(schedule).tolist()
    assert sched.alphas_cumprod == ref.alphas_cumprod.tolist()


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_identical_for_every_count(spacing):
    ref = make_sampler("ddim", spacing=spacing)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        assert _C.make_timesteps(n, 1000, spacing) == ref.timesteps.tolist(), n


def test_fp16_conversion_matches_torch():
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    halves = bits.view(torch.float16)
    got = torch.empty(65536, dtype=torch.float32)
    _C.f16_bits_to_f32(runtime._buffer(bits), runtime._buffer(got))
    want = halves.float()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~want.isnan()], want[~want.isnan()])

    g = torch.Generator().manual_seed(0)
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2 ** -24, 2 ** -25, 1.5 * 2 ** -25,
                             2 ** -14, 2 ** -14 * (1 - 2 ** -11), float("inf"), -float("inf"), 1 + 2 ** -11,
                             1 + 3 * 2 ** -11, 1e-30, 3e38])
    normal = torch.randn(200_000, generator=g)
    normal *= 10 ** torch.randint(-8, 6, (200_000,), generator=g)
    values = torch.cat([specials, normal, halves.float() * (1 + 2 ** -11)])  # every tie between neighbouring halves
    values = values[~values.isnan()].contiguous()
    out = torch.empty(values.numel(), dtype=torch.int16)
    _C.f32_to_f16_bits(runtime._buffer(values), runtime._buffer(out))
    assert torch.equal(out, values.half().view(torch.int16))


def test_bf16_conversion_matches_torch():
    g = torch.Generator().manual_seed(1)
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    exact = bits.view(torch.bfloat16).float()
    values = torch.cat([exact, exact * (1 + 2 ** -8), exact * (1 + 2 ** -9),  # ties and near-ties
                        torch.randn(200_000, generator=g) * 10 ** torch.randint(-30, 30, (200_000,), generator=g),
                        torch.tensor([3.4e38, -3.4e38, 1e-45, float("inf"), -float("inf")])])
    values = values[~values.isnan()].contiguous()
    out = torch.empty(values.numel(), dtype=torch.int16)
    _C.f32_to_bf16_bits(runtime._buffer(values), runtime._buffer(out))
    assert torch.equal(out, values.bfloat16().view(torch.int16))


# -- the fused step ------------------------------------------------------------------------------------------
GUIDANCE = {"none": (1.0, 0.0), "cfg": (7.5, 0.0), "cfg+rescale": (5.0, 0.7)}


def _sampler(name, prediction, clip, **options):
    kw = {"eta": 0.6} if name == "ddim-eta" else {}
    options = {"schedule": "cosine", "spacing": "trailing", **options}
    return make_sampler(name.split("-")[0], prediction=prediction, clip_sample=clip, **kw, **options)


def _prediction(sampler, t, x, x0, noise):
    """What a good model predicts at t for a sample x heading to x0 (eps or v), plus ``noise``: keeps every
    step finite in fp16, where purely random eps predictions overflow as alpha_t -> 0."""
    a = sampler.abar(int(t))
    eps = (x.float() - a ** 0.5 * x0) / (1 - a) ** 0.5
    out = eps if sampler.prediction == "eps" else a ** 0.5 * eps - (1 - a) ** 0.5 * x0
    return out + noise


def _run_both(name, prediction, guidance, dtype, clip=False, steps=6, shape=(2, 3, 5, 6, 7), timesteps=None,
              **options):
    """Steps the reference and the fused sampler side by side on the same predictions and noise draws."""
    scale, rescale = GUIDANCE[guidance]
    ref = _sampler(name, prediction, clip, **options)
    fused = runtime.FusedSampler(_sampler(name, prediction, clip, **options))
    if timesteps is None:
        ref.set_timesteps(steps)
        fused.set_timesteps(steps)
    else:
        ref.set_timesteps(timesteps=timesteps)
        fused.set_timesteps(timesteps=timesteps)
    g = torch.Generator().manual_seed(1)
    x_ref = x_fused = torch.randn(shape, generator=g).to(dtype)
    x0 = torch.randn(shape, generator=g) * 0.5
    gen_ref, gen_fused = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    pairs = []
    for t in ref.timesteps:
        cond = _prediction(ref, t, x_ref, x0, 0.1 * torch.randn(shape, generator=g)).to(dtype)
        uncond = (_prediction(ref, t, x_ref, x0, 0.3 * torch.randn(shape, generator=g)).to(dtype)
                  if guidance != "none" else None)
        x_ref = ref.guided_step(cond, uncond, t, x_ref, scale, rescale, gen_ref)
        x_fused = fused.guided_step(cond, uncond, t, x_fused, scale, rescale, gen_fused)
        pairs.append((x_fused, x_ref))
    return pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("prediction", ["v", "eps"])
@pytest.mark.parametrize("name", ["ddim", "ddim-eta", "ddpm", "dpmpp2m"])
def test_fused_step_matches_reference(name, prediction, guidance, dtype):
    for i, (got, want) in enumerate(_run_both(name, prediction, guidance, dtype)):
        assert got.dtype == want.dtype == dtype
        if guidance == "cfg+rescale":
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]  # 16-bit: one ulp
            assert_close(got, want, atol=tol, rtol=tol, what=f"step {i}")
        else:
            assert torch.equal(got, want), f"step {i}: max |diff| {(got.float() - want.float()).abs().max()}"
    assert got.isfinite().all()


@pytest.mark.parametrize("name", ["ddim", "dpmpp2m"])
def test_fused_step_with_clipping_is_bit_identical(name):
    for got, want in _run_both(name, "eps", "cfg", torch.float32, clip=True):
        assert torch.equal(got, want)


SD_SCHEDULE = dict(schedule="scaled_linear", beta_start=0.00085, beta_end=0.0125, spacing="leading", steps_offset=1,
                   set_alpha_to_one=False)


@pytest.mark.parametrize("name", ["ddim", "ddim-eta", "ddpm", "dpmpp2m"])
def test_fused_step_on_a_diffusers_scheduler_config_is_bit_identical(name):
    """Stable Diffusion's scheduler settings: a beta range, steps_offset, the final alpha of abar[0]."""
    for i, (got, want) in enumerate(_run_both(name, "eps", "cfg", torch.float32, **SD_SCHEDULE)):
        assert torch.equal(got, want), f"step {i}"


def test_fused_ddim_with_a_fixed_stride_is_bit_identical():
    """diffusers' DDIM stepping (t -> t - N // n) on a trailing grid, where it differs from the grid's next."""
    for got, want in _run_both("ddim", "eps", "cfg", torch.float32, steps=7, fixed_stride=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["ddim", "dpmpp2m"])
def test_fused_step_on_explicit_timesteps_is_bit_identical(name):
    for got, want in _run_both(name, "v", "cfg", torch.float32, timesteps=[999, 760, 333, 41, 2]):
        assert torch.equal(got, want)


def test_ranged_betas_offsets_and_solver_grids_identical():
    for schedule in ("linear", "scaled_linear"):
        assert (_C.make_betas(schedule, 1000, 0.00085, 0.012)
                == make_betas(schedule, 1000, 0.00085, 0.012).tolist())
    for spacing in SPACINGS:
        for solver_grid in (False, True):
            for offset in (0, 1):
                for n in range(1, 400, 7):
                    want = make_timesteps(n, 1000, spacing, offset, solver_grid).tolist()
                    assert _C.make_timesteps(n, 1000, spacing, offset, solver_grid) == want, (spacing, n)
    fused = runtime.FusedSampler(make_sampler("dpmpp2m", spacing="leading", steps_offset=1))
    fused.set_timesteps(10)  # diffusers' DPMSolverMultistepScheduler: 1000 // 11 apart, + 1
    assert fused.timesteps.tolist() == [901, 811, 721, 631, 541, 451, 361, 271, 181, 91]
    with pytest.raises(ValueError, match="strictly descending"):
        _C.Scheduler("ddim").set_explicit_timesteps([5, 9])


def test_mixed_dtypes_and_in_place():
    ref, fused = DDIM(prediction="v"), runtime.FusedSampler(DDIM(prediction="v"))
    ref.set_timesteps(4)
    fused.set_timesteps(4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, 4, generator=g).half()
    pred = torch.randn(x.shape, generator=g)  # fp32 prediction (a blend's output) stepping an fp16 sample
    t = ref.timesteps[0]
    want = ref.step(pred, t, x)
    x_in_place = x.clone()
    got = fused.step(pred, t, x_in_place, out=x_in_place)
    assert got is x_in_place and torch.equal(got, want)


def test_dpm_history_resets_with_set_timesteps():
    pairs_a = _run_both("dpmpp2m", "v", "cfg", torch.float32, steps=5)
    pairs_b = _run_both("dpmpp2m", "v", "cfg", torch.float32, steps=5)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(pairs_a, pairs_b))


def test_fused_step_bad_inputs():
    s = runtime.FusedSampler.make("ddim")
    s.set_timesteps(4)
    x = torch.zeros(2, 3, 4, 4, 4)
    t = int(s.timesteps[0])
    with pytest.raises(ValueError, match="model_output has shape"):
        s.step(torch.zeros(2, 3, 4, 4, 5), t, x)
    with pytest.raises(TypeError, match="x must be a float32, float16 or bfloat16"):
        s.step(x, t, x.double())
    with pytest.raises(TypeError, match="uncond must be one of"):
        s.guided_step(x, x.to(torch.float64), t, x, 2.0)
    with pytest.raises(ValueError, match="contiguous"):
        s.step(x.transpose(3, 4), t, x)
    with pytest.raises(ValueError, match="contiguous"):
        s.step(x, t, x.transpose(3, 4))
    with pytest.raises(ValueError, match="not in this sampler's timesteps"):
        s.step(x, 5, x)
    with pytest.raises(ValueError, match="guidance_rescale must be in"):
        s.guided_step(x, x, t, x, 2.0, 1.5)
    with pytest.raises(ValueError, match="needs uncond"):
        s.step(x, t, x, guidance_rescale=0.5)
    with pytest.raises(TypeError, match="out must be one of"):
        s.step(x, t, x, out=torch.zeros(2, 3, 4, 4, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="eta is a DDIM parameter"):
        _C.Scheduler("ddpm", eta=0.5)
    with pytest.raises(ValueError, match="schedule must be one of"):
        _C.Scheduler("ddim", "sigmoid")
    with pytest.raises(TypeError, match="reference must be one of"):
        runtime.FusedSampler(object())


# -- MultiDiffusion ------------------------------------------------------------------------------------------
def test_window_plans_and_weights_identical():
    for T in range(1, 90):
        for window in (1, 2, 3, 5, 8, 16):
            for overlap in range(0, window):
                starts = window_plan(T, window, overlap)
                assert _C.window_plan(T, window, overlap) == starts
                for weighting in ("uniform", "ramp"):
                    assert _C.window_weights(T, starts, window, weighting) == \
                        window_weights(T, starts, window, weighting).tolist()
    with pytest.raises(ValueError, match="overlap"):
        _C.window_plan(10, 4, 4)


@settings(max_examples=60, deadline=None)
@given(T=st.integers(1, 40), window=st.integers(1, 12), overlap_frac=st.floats(0, 0.95), b=st.integers(1, 3),
       c=st.integers(1, 4), h=st.integers(1, 9), w=st.integers(1, 9), weighting=st.sampled_from(["uniform", "ramp"]),
       dtypes=st.sampled_from([(torch.float32, torch.float32), (torch.float16, torch.float16),
                               (torch.float16, torch.float32), (torch.float32, torch.float16),
                               (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]))
def test_blend_bit_identical(T, window, overlap_frac, b, c, h, w, weighting, dtypes):
    overlap = min(int(overlap_frac * window), window - 1)
    starts = window_plan(T, window, overlap)
    length = min(window, T)
    in_dtype, out_dtype = dtypes
    g = torch.Generator().manual_seed(T * 1000 + window)
    stacked = torch.randn(len(starts), b, c, length, h, w, generator=g).to(in_dtype)
    want = blend(list(stacked), starts, window_weights(T, starts, window, weighting), T).to(out_dtype)
    got = runtime.blend_windows(stacked, T, window, overlap, weighting, out_dtype)
    assert got.shape == (b, c, T, h, w) and got.dtype == out_dtype
    assert torch.equal(got, want)
    assert torch.equal(runtime.blend_windows(list(stacked), T, window, overlap, weighting, out_dtype), want)


def test_blend_bad_inputs():
    x = torch.zeros(6, 1, 3, 16, 4, 4)
    with pytest.raises(ValueError, match="hold 6 windows of 16 frames, but the plan"):
        runtime.blend_windows(x, 80, 16, 4)
    with pytest.raises(ValueError, match=r"\(N, B, C, L, H, W\)"):
        runtime.blend_windows(x[0], 80, 16, 2)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        runtime.blend_windows(x.double(), 80, 16, 2)
    with pytest.raises(ValueError, match="contiguous"):
        runtime.blend_windows(x.transpose(4, 5), 80, 16, 2)
    assert runtime.blend_windows(x, 80, 16, 2).shape == (1, 3, 80, 4, 4)


def test_binding_checks_every_buffer_before_reading_it():
    """The raw binding, called directly: every buffer's size, dtype and device is checked against the pass."""
    buf = runtime._buffer
    ddim, dpm = _C.Scheduler("ddim"), _C.Scheduler("dpmpp2m")
    ddim.set_timesteps(4)
    dpm.set_timesteps(4)
    coefs = ddim.step_coefs(ddim.timesteps[0])
    x, y = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    step = lambda **kw: _C.fused_step(**{**dict(coefs=coefs, batch=2, cond=buf(x), uncond=None,  # noqa: E731
                                                guidance_scale=1.0, guidance_rescale=0.0, x=buf(x), out=buf(y),
                                                history=None, noise=None, stats=None, stream=0), **kw})
    step()
    cases = [
        (dict(out=buf(torch.zeros(23))), "out has 23 elements, the pass needs 24"),
        (dict(cond=buf(torch.zeros(25))), "cond has 25 elements, the pass needs 24"),
        (dict(out=buf(y.half())), "out has dtype float16; accepted: float32"),
        (dict(uncond=buf(x.half())), "uncond has dtype float16; accepted: float32"),
        (dict(cond=(x.data_ptr(), 24, "float32", "cuda")), "cond is on cuda but the other buffers are on cpu"),
        (dict(x=(0, 24, "float32", "cpu")), "x has a null address"),
        (dict(coefs=dpm.step_coefs(dpm.timesteps[0])), "history must be given"),
        (dict(x=buf(x.double()), out=buf(y.double())), "x has dtype float64"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            step(**kwargs)
    table = _C.BlendTable(8, 4, 1)
    win, local, weight = (torch.tensor(v, dtype=d) for v, d in ((table.window, torch.int32),
                                                                (table.local, torch.int32),
                                                                (table.weight, torch.float32)))
    blend = lambda inp, out, w=win: _C.blend(buf(w), buf(local), buf(weight), table.cover,  # noqa: E731
                                             table.num_windows, 2, 4, 8, 5, buf(inp), buf(out), 0)
    blend(torch.zeros(table.num_windows, 2, 4, 5), torch.zeros(2, 8, 5))
    with pytest.raises(ValueError, match="in has 79 elements"):
        blend(torch.zeros(79), torch.zeros(2, 8, 5))
    with pytest.raises(ValueError, match="out has 81 elements, the pass needs 80"):
        blend(torch.zeros(table.num_windows, 2, 4, 5), torch.zeros(81))
    with pytest.raises(ValueError, match="window has dtype int64; accepted: int32"):
        blend(torch.zeros(table.num_windows, 2, 4, 5), torch.zeros(2, 8, 5), win.long())


# -- the C++-only program --------------------------------------------------------------------------------------
def test_cpp_program_links_and_runs_without_python(tmp_path):
    """csrc/ builds as a plain C++ library plus a test executable (CMake, or the compiler directly)."""
    exe = tmp_path / "stunet_runtime_test"
    if shutil.which("cmake"):
        subprocess.run(["cmake", "-S", str(CSRC), "-B", str(tmp_path), "-DCMAKE_BUILD_TYPE=Release"], check=True,
                       capture_output=True)
        subprocess.run(["cmake", "--build", str(tmp_path), "--parallel", "2"], check=True, capture_output=True)
    else:
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            pytest.fail("neither cmake nor a C++ compiler is on PATH: install one to build the runtime")
        sources = [str(CSRC / f) for f in ("schedule.cpp", "multidiffusion.cpp", "runtime_cpu.cpp",
                                           "tests/runtime_test.cpp")]
        subprocess.run([cxx, "-std=c++17", "-O2", "-ffp-contract=off", f"-I{CSRC}", *sources, "-o", str(exe)],
                       check=True, capture_output=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 failure(s)" in run.stdout


# -- the pipeline ------------------------------------------------------------------------------------------------
def test_runtime_status_reports_the_build():
    assert runtime.available() and "stunet runtime" in runtime.status()


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m"])
def test_pipeline_videos_identical_with_either_runtime(sampler):
    """Base (CFG, rescale off) and SSR (MultiDiffusion over 3 windows in 2 model calls): same frames, bit for bit."""
    import stunet
    from stunet.pipeline import Pipeline
    from utils import randomize_temporal

    torch.manual_seed(0)
    base = randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")))
    ssr = randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset(
        "tiny", in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
        temporal_attn_depth=0, sample_size=16)))
    text = torch.randn(1, 5, base.config.text_dim)
    kw = dict(prompt_embeds=text, num_frames=8, height=8, width=8, num_inference_steps=3, seed=5,
              ssr=SSROptions(window=4, overlap=1, batch_size=2, guidance_scale=2.0))
    frames = {}
    for rt in ("cpp", "python"):
        pipe = Pipeline(base, None, ssr, sampler=sampler, runtime=rt, progress=False)
        frames[rt] = pipe(**kw)
    assert np.array_equal(frames["cpp"].frames, frames["python"].frames)
    assert np.array_equal(frames["cpp"].low_res_frames, frames["python"].low_res_frames)


def test_pipeline_runtime_argument_is_checked():
    import stunet
    from stunet.pipeline import Pipeline

    with pytest.raises(ValueError, match="runtime must be one of"):
        Pipeline(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")), runtime="rust")


class _CPUOnlyBuild:
    """stunet._C as `pip install -e .` builds it without STUNET_CUDA=1."""

    def has_cuda(self) -> bool:
        return False


def test_runtime_says_where_it_cannot_step(monkeypatch, caplog):
    """A CUDA model with a runtime built without its CUDA passes (the default install) samples with the Python
    reference, saying why; asked for explicitly, the C++ runtime is refused before any compute."""
    import stunet
    from stunet.pipeline import Pipeline
    from stunet.pipeline.pipeline import default_runtime

    assert runtime.unavailable_on("cpu") is None and default_runtime("cpu") == "cpp"
    assert "steps CPU and CUDA tensors, not meta ones" in runtime.unavailable_on("meta")
    with pytest.raises(ValueError, match="not meta ones"):
        runtime.blend_windows(torch.zeros(1, 1, 1, 2, 1, 1, device="meta"), 2, 2, 0)
    monkeypatch.setattr(runtime, "_C", _CPUOnlyBuild())
    assert runtime.unavailable_on("cpu") is None
    assert "built without its CUDA passes; reinstall with STUNET_CUDA=1" in runtime.unavailable_on("cuda:0")
    with caplog.at_level(logging.WARNING, logger="stunet"):
        assert default_runtime(torch.device("cuda", 0)) == "python"
    assert "sampling with the Python reference runtime: stunet._C was built without" in caplog.text

    monkeypatch.setattr(runtime, "_C", None)
    model = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny"))
    with pytest.raises(RuntimeError, match="runtime='cpp' but the C\\+\\+ runtime stunet._C is not available"):
        Pipeline(model, runtime="cpp")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stunet"):
        assert Pipeline(model, progress=False).runtime == "python"
    assert "sampling with the Python reference runtime" in caplog.text


# -- GPU ---------------------------------------------------------------------------------------------------------
def _cuda_runtime():
    if not runtime.cuda_available():
        pytest.fail("stunet._C was built without CUDA: reinstall with STUNET_CUDA=1 on the GPU machine")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("guidance", list(GUIDANCE))
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cuda_fused_step_matches_torch_on_cuda(name, guidance, dtype):
    _cuda_runtime()
    scale, rescale = GUIDANCE[guidance]
    # Odd sizes take the scalar path, (2, 3, 8, 32, 32) the vector path, and (4, 1, 1, 2, 3) the vector path with
    # vectors of 8 elements straddling samples of 6 (guidance rescale's per-sample factor changes mid-vector).
    for shp in ((2, 3, 9, 33, 31), (2, 3, 8, 32, 32), (4, 1, 1, 2, 3)):
        ref, fused = make_sampler(name), runtime.FusedSampler(make_sampler(name))
        ref.set_timesteps(5)
        fused.set_timesteps(5)
        g = torch.Generator().manual_seed(0)
        x_ref = x_fused = torch.randn(shp, generator=g).to("cuda", dtype)
        gr, gf = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        x0 = torch.randn(shp, generator=g).cuda() * 0.5
        for t in ref.timesteps:
            cond = _prediction(ref, t, x_ref, x0, 0.1 * torch.randn(shp, generator=g).cuda()).to(dtype)
            uncond = (_prediction(ref, t, x_ref, x0, 0.3 * torch.randn(shp, generator=g).cuda()).to(dtype)
                      if guidance != "none" else None)
            x_ref = ref.guided_step(cond, uncond, t, x_ref, scale, rescale, gr)
            x_fused = fused.guided_step(cond, uncond, t, x_fused, scale, rescale, gf)
            tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
            assert_close(x_fused, x_ref, atol=tol, rtol=tol, what=f"{shp} t={int(t)}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_cuda_blend_bit_identical(dtype):
    _cuda_runtime()
    for T, window, overlap, hw in ((80, 16, 2, (32, 32)), (37, 8, 3, (5, 7)), (5, 16, 2, (8, 8))):
        starts = window_plan(T, window, overlap)
        stacked = torch.randn(len(starts), 2, 3, min(window, T), *hw, device="cuda").to(dtype)
        want = blend(list(stacked), starts, window_weights(T, starts, window, "ramp"), T).to(dtype)
        assert torch.equal(runtime.blend_windows(stacked, T, window, overlap, "ramp", dtype), want)


@pytest.mark.gpu
def test_cuda_step_and_blend_capture_in_a_cuda_graph():
    _cuda_runtime()
    s = runtime.FusedSampler.make("dpmpp2m")
    s.set_timesteps(4)
    x = torch.randn(1, 3, 16, 64, 64, device="cuda", dtype=torch.float16)
    windows = torch.randn(2, 1, 3, 16, 64, 64, device="cuda", dtype=torch.float16)
    out = torch.empty_like(x)
    t0 = int(s.timesteps[0])
    ref = runtime.FusedSampler.make("dpmpp2m")
    ref.set_timesteps(4)
    want = ref.step(runtime.blend_windows(windows, 16, 16, 2, dtype=torch.float16), t0, x)
    s.step(x, t0, x, out=out)  # warm-up allocates the history buffer outside the capture
    s.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pred = runtime.blend_windows(windows, 16, 16, 2, dtype=torch.float16)
        s.step(pred, t0, x, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


def test_cuda_sources_compile_with_nvcc(tmp_path):
    """The CUDA passes compile with setup.py's flags (sm_90) wherever nvcc exists, GPU or not (building them into
    stunet._C stays an explicit opt-in, STUNET_CUDA=1), and the machine code keeps the file's promises, read
    with cuobjdump (shipped with Triton): no kernel spills registers, and on the vector path (8 elements a
    thread) every access to the video and the solver's history is 16 bytes wide."""
    import re

    from triton import knobs

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed here; the CUDA build is exercised on the GPU machine")
    obj = tmp_path / "runtime_cuda.o"
    run = subprocess.run([nvcc, "-c", str(CSRC / "runtime_cuda.cu"), "-o", str(obj), "-std=c++17", "-O3",
                          "--fmad=false", "-DSTUNET_WITH_CUDA", f"-I{CSRC}", "-Xcompiler", "-fPIC",
                          "-gencode=arch=compute_90,code=sm_90"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]

    def dump(flag: str) -> str:
        return subprocess.run([knobs.nvidia.cuobjdump.path, flag, str(obj)], capture_output=True, text=True,
                              check=True).stdout

    usage = re.findall(r"Function (\S+):\s*\n\s*REG:\d+ STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", dump("-res-usage"))
    assert len(usage) >= 20 and all(stack == local == "0" for _, stack, local in usage), usage
    sass = dict(re.findall(r"Function : (\S+)\n(.*?)(?=\n\s+Function : |\Z)", dump("-sass"), re.S))
    vector = {name: code for name, code in sass.items() if re.search(r"(step|blend)_kernel.*Li8E", name)}
    assert len(vector) == 18, sorted(sass)  # 9 (prediction, video) dtype pairs of each pass
    for name, code in vector.items():
        narrow = re.findall(r"\b(?:LDG\.E|STG\.E)(?:\.U16)?(?![.\w])", code)  # 2- and 4-byte accesses
        tables = 3 if "blend_kernel" in name else 0  # a covering window's index, weight and offset (int32, fp32)
        assert narrow.count("LDG.E") == tables and len(narrow) == tables, (name, narrow)
        assert "LDG.E.128" in code and "STG.E.128" in code, name
