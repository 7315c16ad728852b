"""Converted diffusers pipelines run by stunet.Pipeline: tiny random TextToVideoSDPipeline and AnimateDiffPipeline
folders built offline, saved, converted by `stunet convert`, and generated with the same latents (text-to-video)
or from the same seed (video-to-video, against diffusers' video-to-video pipelines); the samplers
against diffusers' schedulers; the CLI path from a folder to a video."""
from __future__ import annotations

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import diffusers_models as tiny
import numpy as np
import PIL.Image
import pytest
import torch
from utils import current_umask

import stunet
from stunet.convert import convert_folder
from stunet.pipeline.latent import VideoVAE
from stunet.sampling.samplers import make_sampler, scheduler_options

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


def _saved(tmp_path_factory, build):
    root = tmp_path_factory.mktemp("pipeline")
    pipe = build(root)
    pipe.save_pretrained(root / "pipe")
    return pipe, root / "pipe"


@pytest.fixture(scope="module")
def t2v_folder(tmp_path_factory):
    """A saved TextToVideoSDPipeline (ModelScope's layout) with Stable Diffusion's DDIM settings."""
    return _saved(tmp_path_factory, tiny.text_to_video_pipeline)


@pytest.fixture(scope="module")
def animatediff_folder(tmp_path_factory):
    """A saved AnimateDiffPipeline (an SD U-Net + a MotionAdapter) with AnimateDiff's linear DDIM schedule."""
    return _saved(tmp_path_factory, tiny.animatediff_pipeline)


def _latents(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("runtime", ["python", "cpp"])
@pytest.mark.parametrize("which", ["t2v", "animatediff"])
def test_converted_pipelines_reproduce_diffusers_frames(which, runtime, request, tmp_path):
    pipe, folder = request.getfixturevalue(f"{which}_folder")
    frames = 4 if which == "t2v" else 5
    guidance = 9.0 if which == "t2v" else 7.5  # each diffusers pipeline's default
    latents = _latents(frames)
    with torch.no_grad():
        want = np.asarray(pipe("a red fox", num_frames=frames, height=16, width=16, num_inference_steps=4,
                               guidance_scale=guidance, latents=latents.clone(), output_type="np").frames)
    convert_folder(folder, tmp_path / "stunet", dtype="fp32")
    ours = stunet.Pipeline.from_pretrained(tmp_path / "stunet", device="cpu", runtime=runtime, progress=False)
    assert isinstance(ours.sampler, stunet.samplers.DDIM) and ours.sampler.steps_offset == 1
    assert not ours.sampler.set_alpha_to_one
    got = ours("a red fox", num_frames=frames, height=16, width=16, num_inference_steps=4, guidance_scale=guidance,
               latents=latents.clone()).frames
    assert got.shape == want.shape == (1, frames, 16, 16, 3)
    assert np.abs(got - want).max() <= 1e-4, f"max |stunet - diffusers| {np.abs(got - want).max():.3g}"


def test_convert_folder_writes_the_engine_format_and_the_pipeline_parts(t2v_folder, tmp_path, capsys):
    _, folder = t2v_folder
    model = convert_folder(folder, tmp_path / "out")  # fp16 weights by default
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "vae", "text_encoder",
                                               "tokenizer", "scheduler"}
    # a new folder's mode, and (less x) a new file's: never the staging's or the source's
    new_mode = 0o777 & ~current_umask()
    assert [p for p in [out, *out.rglob("*")] if p.stat().st_mode & 0o777 != (new_mode if p.is_dir() else
                                                                             new_mode & 0o666)] == []
    loaded = stunet.STUNet.from_pretrained(out)
    assert loaded.dtype == model.dtype == torch.float16 and loaded.config == model.config
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())  # as written
    assert loaded.config.prediction == "eps" and loaded.config.schedule == "scaled_linear"
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        convert_folder(folder, out)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        convert_folder(tmp_path / "missing", tmp_path / "x")
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'no'"):  # "no" would read as true
        convert_folder(folder, out, overwrite="no")
    # the output folder replaces what was there, and gets copies of the source's parts: never the source, a
    # folder that holds it (it would be deleted) or one inside it (the parts would be copied into themselves)
    source = tmp_path / "source"
    shutil.copytree(folder, source)
    for src, dst in ((source, source), (source / "unet", source), (source, source / "unet" / ".."),
                     (source, source / "vae" / "out")):
        with pytest.raises(ValueError, match=r"and the folder being converted, .* overlap \(one holds the other\)"):
            convert_folder(src, dst, overwrite=True)
    from stunet.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(source / "unet"), "-o", str(source), "--overwrite", "-q"])
    assert exit_.value.code == 2
    assert sorted(p.name for p in source.iterdir()) == sorted(p.name for p in folder.iterdir())
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:  # a file where a folder of the output's path would be made
        main(["convert", str(source), "-o", str(tmp_path / "a_file" / "out"), "-q"])
    assert exit_.value.code == 2 and "a_file' is a file, not a directory" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_convert_refuses_an_output_folder_overlapping_its_motion_adapter(animatediff_folder, tmp_path):
    """A MotionAdapter folder named apart from the pipeline (--motion-adapter) is a source too: an output
    folder that is it, holds it or lies inside it is refused, and it is left as it was."""
    from stunet.cli import main

    _, folder = animatediff_folder
    adapter = tmp_path / "adapter"
    shutil.copytree(folder / "motion_adapter", adapter)
    before = sorted(p.name for p in adapter.iterdir())
    for dst in (adapter, tmp_path, adapter / "out"):
        with pytest.raises(ValueError, match="and the motion adapter being converted, .* overlap"):
            convert_folder(folder / "unet", dst, motion_adapter=adapter, overwrite=True)
        with pytest.raises(SystemExit) as exit_:
            main(["convert", str(folder / "unet"), "--motion-adapter", str(adapter), "-o", str(dst), "--overwrite"])
        assert exit_.value.code == 2
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_a_latent_model_needs_its_vae(t2v_folder, tmp_path):
    _, folder = t2v_folder
    model = convert_folder(folder, tmp_path / "m", dtype="fp32")
    with pytest.raises(ValueError, match="latent model .*pass its VAE as vae="):
        stunet.Pipeline(model, None)
    pixel = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="vae= is for latent models"):
        stunet.Pipeline(pixel, None, vae=tiny.vae())
    with pytest.raises(FileNotFoundError, match="no model folder"):
        stunet.Pipeline.from_pretrained(tmp_path / "nowhere")
    pipe = stunet.Pipeline.from_pretrained(tmp_path / "m", device="cpu", progress=False)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        pipe("a fox", num_frames=4, height=18, width=16)
    with pytest.raises(ValueError, match="latents must be a tensor of shape \\(1, 4, 4, 8, 8\\)"):
        pipe("a fox", num_frames=4, height=16, width=16, latents=torch.zeros(1, 4, 4, 16, 16))


# -- video-to-video: the VAE encodes the input video ----------------------------------------------------------
V2V_PIPELINES = {"t2v": "VideoToVideoSDPipeline", "animatediff": "AnimateDiffVideoToVideoPipeline"}


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp2m"])
@pytest.mark.parametrize("which", ["t2v", "animatediff"])
def test_video_to_video_reproduces_diffusers_from_a_seed(which, sampler, request, tmp_path):
    """One seed gives diffusers' video: the VAE's posterior sample and the noise are drawn as its video-to-video
    pipelines draw them, and the strength runs their number of steps (int(4 * 0.9) = 3, where rounding gives 4).
    Two videos of 20 frames for AnimateDiff's, which encodes (and draws) per video in chunks of 16 frames."""
    pipe, _ = request.getfixturevalue(f"{which}_folder")
    parts = dict(pipe.components)
    if sampler == "dpmpp2m":
        parts["scheduler"] = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    theirs = getattr(diffusers, V2V_PIPELINES[which])(**parts)
    theirs.set_progress_bar_config(disable=True)
    B, F = (1, 4) if which == "t2v" else (2, 20)  # diffusers' ModelScope pipeline cannot take two videos
    frames = np.random.default_rng(1).integers(0, 256, (B, F, 16, 16, 3), dtype=np.uint8)
    if which == "t2v":  # a (B, F, C, H, W) tensor in [0, 1]
        video, sized = torch.from_numpy(frames).permute(0, 1, 4, 2, 3).float() / 255, {}
    else:  # PIL frames, resized to height x width
        video, sized = [[PIL.Image.fromarray(f) for f in clip] for clip in frames], dict(height=16, width=16)
    call = dict(strength=0.9, num_inference_steps=4, guidance_scale=7.5)
    with torch.no_grad():
        want = np.asarray(theirs(prompt=["a red fox"] * B, video=video, generator=torch.Generator().manual_seed(3),
                                 output_type="np", **sized, **call).frames)
    theirs.save_pretrained(tmp_path / "pipe")  # with the scheduler it ran
    convert_folder(tmp_path / "pipe", tmp_path / "stunet", dtype="fp32")
    ours = stunet.Pipeline.from_pretrained(tmp_path / "stunet", device="cpu", progress=False)
    assert type(ours.sampler).__name__ == {"ddim": "DDIM", "dpmpp2m": "DPMSolverPP2M"}[sampler]
    assert repr(stunet.Pipeline.from_pretrained(tmp_path / "stunet", device="cpu", sampler=None).sampler) == repr(
        ours.sampler)  # None: the folder's scheduler, as when sampler= is not given
    steps = []
    res = ours.video_to_video(frames, ["a red fox"] * B, seed=3,
                              callback_on_step_end=lambda p, i, t, kw: steps.append(t), **call)
    assert len(steps) == 3 and set(res.timings) == {"text", "encode", "base", "decode"}
    assert res.frames.shape == want.shape == (B, F, 16, 16, 3)
    err = np.abs(res.frames - want).max()
    assert err <= 1e-4, f"max |stunet - diffusers| {err:.3g}"


def test_the_vae_encodes_frame_by_frame_whatever_the_chunking(t2v_folder, capsys):
    pipe, _ = t2v_folder
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    whole, chunked = VideoVAE(pipe.vae, chunk_frames=10), VideoVAE(pipe.vae, chunk_frames=3)
    sample = whole.encode(video, torch.Generator().manual_seed(0))
    assert sample.shape == (2, 4, 5, 8, 8) and sample.dtype == torch.float32
    torch.testing.assert_close(chunked.encode(video, torch.Generator().manual_seed(0)), sample, atol=1e-5, rtol=0)
    mean = whole.encode(video)  # no generator: the posterior's mean
    with torch.no_grad():
        want = pipe.vae.encode(video[1, :, 2][None]).latent_dist.mean[0] * pipe.vae.config.scaling_factor
    torch.testing.assert_close(mean[1, :, 2], want, atol=1e-5, rtol=0)
    assert (sample - mean).abs().max() > 1e-3
    capsys.readouterr()
    chunked.decode(chunked.encode(video, progress=True), progress=True)  # a bar per pass, counting frames
    err = capsys.readouterr().err
    assert "encode: 100%" in err and "decode: 100%" in err and "10/10" in err
    with pytest.raises(ValueError, match="H and W multiples of 2"):
        whole.encode(torch.zeros(1, 3, 2, 15, 16))
    with pytest.raises(TypeError, match="vae must be a diffusers AutoencoderKL"):
        VideoVAE(pipe.unet)


def test_an_fp16_vae_that_asks_for_it_encodes_in_fp32_and_stays_fp16(t2v_folder):
    """``force_upcast`` (AutoencoderKL's default): encode as the FP32 VAE of the same (FP16) weights does,
    drawing the posterior sample in FP32, as diffusers' AnimateDiff video-to-video does; decode in FP16."""
    import copy

    pipe, _ = t2v_folder
    video = torch.rand(1, 3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    half = copy.deepcopy(pipe.vae).half()
    assert half.config.force_upcast
    want = VideoVAE(copy.deepcopy(half).float()).encode(video, torch.Generator().manual_seed(0))
    vae = VideoVAE(half)
    got = vae.encode(video, torch.Generator().manual_seed(0))
    assert torch.equal(got, want)
    assert all(p.dtype == torch.float16 for p in half.parameters())  # the VAE itself is left as it is
    assert vae.decode(got).dtype == torch.float32  # decoded in FP16, returned in FP32
    half.register_to_config(force_upcast=False)
    plain = VideoVAE(half).encode(video, torch.Generator().manual_seed(0))  # FP16 all the way
    assert not torch.equal(plain, want) and torch.allclose(plain, want, atol=0.05)


def test_a_converted_pipeline_shared_among_threads_gives_each_prompt_its_own_video(t2v_folder, tmp_path,
                                                                                   monkeypatch):
    """CLIP's Rust-backed tokenizer, the fast backend's text keys/values (every prompt padded to one length, so
    another prompt's would fit) and the VAE, shared by four threads: each video is the one made alone."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the kernel ops' reference math: this tests the sharing
    _, folder = t2v_folder
    convert_folder(folder, tmp_path / "stunet", dtype="fp32")
    pipe = stunet.Pipeline.from_pretrained(tmp_path / "stunet", device="cpu", backend="fast", progress=False)
    assert pipe.text_encoder.tokenizer.is_fast
    prompts = ["a red fox", "a blue whale in the deep sea", "snow", "a cat on a sofa"]
    kw = dict(num_frames=4, height=16, width=16, num_inference_steps=2, seed=7)
    alone = {p: pipe(p, **kw).frames for p in prompts}
    with ThreadPoolExecutor(len(prompts)) as pool:
        shared = dict(zip(prompts, pool.map(lambda p: pipe(p, **kw).frames, prompts)))
    for p in prompts:
        assert np.array_equal(shared[p], alone[p]), p


def test_video_to_video_of_a_latent_model_checks_the_video_in_pixels(t2v_folder, tmp_path):
    _, folder = t2v_folder
    convert_folder(folder, tmp_path / "m", dtype="fp32")
    pipe = stunet.Pipeline.from_pretrained(tmp_path / "m", device="cpu", progress=False)
    with pytest.raises(ValueError, match=r"init_video must be a tensor of shape \(1, 3, 4, 16, 16\)"):
        pipe("a fox", num_frames=4, height=16, width=16, init_video=torch.zeros(1, 3, 4, 8, 8), strength=0.5)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4"):
        pipe.video_to_video(np.zeros((4, 16, 16, 3)), "a fox", height=18)
    res = pipe.video_to_video(np.zeros((4, 8, 8, 3)), "a fox", height=16, width=16, num_inference_steps=2, seed=0)
    assert res.frames.shape == (1, 4, 16, 16, 3)


# -- samplers against diffusers' schedulers --------------------------------------------------------------------
def _trajectory(scheduler, sampler, steps=None, timesteps=None, shape=(1, 4, 3, 4, 4)):
    """Both step the same deterministic predictions; returns their samples after every step."""
    if timesteps is None:
        scheduler.set_timesteps(steps)
        sampler.set_timesteps(steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
        sampler.set_timesteps(timesteps=timesteps)
    assert sampler.timesteps.tolist() == scheduler.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    ours, theirs = x.clone(), x.clone()
    for t in sampler.timesteps:
        pred = torch.randn(shape, generator=g)
        ours = sampler.step(pred, t, ours)
        theirs = scheduler.step(pred, t, theirs).prev_sample
        yield ours, theirs


SCHEDULER_CONFIGS = [
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           set_alpha_to_one=False, clip_sample=False)),
    ("DDIMScheduler", dict(beta_schedule="linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                           clip_sample=False, prediction_type="v_prediction")),
    ("DDIMScheduler", dict(beta_schedule="scaled_linear", timestep_spacing="trailing", clip_sample=False)),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                         steps_offset=1, timestep_spacing="leading")),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="linear", timestep_spacing="linspace",
                                         prediction_type="v_prediction")),
    ("DPMSolverMultistepScheduler", dict(beta_schedule="scaled_linear", timestep_spacing="trailing")),
]


@pytest.mark.parametrize("steps", [7, 25])
@pytest.mark.parametrize("kind,options", SCHEDULER_CONFIGS, ids=["ddim-sd", "ddim-v", "ddim-trailing", "dpm-leading",
                                                                  "dpm-linspace", "dpm-trailing"])
def test_samplers_reproduce_diffusers_schedulers(kind, options, steps):
    scheduler = getattr(diffusers, kind)(**options)
    name, kwargs = scheduler_options(dict(scheduler.config, _class_name=kind))
    for i, (ours, theirs) in enumerate(_trajectory(scheduler, make_sampler(name, **kwargs), steps)):
        err = (ours - theirs).abs().max().item()
        assert err <= 1e-4 * max(1.0, theirs.abs().max().item()), f"step {i}: max |err| {err:.3g}"


def test_ddim_steps_by_diffusers_fixed_stride_only_when_asked():
    """diffusers' DDIM steps from t to t - N // n; on a "trailing" grid of 7 steps that is not always the next
    timestep of the grid, which stunet's own DDIM steps to."""
    own, diffusers_like = make_sampler("ddim", spacing="trailing"), make_sampler("ddim", spacing="trailing",
                                                                                fixed_stride=True)
    own.set_timesteps(7)
    diffusers_like.set_timesteps(7)
    assert own.timesteps.tolist() == diffusers_like.timesteps.tolist() == [999, 856, 713, 570, 428, 285, 142]
    assert own.prev_timestep(713) == 570 and diffusers_like.prev_timestep(713) == 571
    assert own.prev_timestep(142) == -1 and diffusers_like.prev_timestep(142) == 0  # diffusers ends at t = 0
    schedule = stunet.samplers.DDIM(schedule="linear", beta_start=0.001, beta_end=0.01, steps_offset=1)
    assert make_sampler("dpmpp2m", **schedule.schedule_options()).betas.tolist() == schedule.betas.tolist()


def test_explicit_timesteps_as_diffusers_takes_them():
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear")
    name, kwargs = scheduler_options(dict(scheduler.config, _class_name="DPMSolverMultistepScheduler"))
    for ours, theirs in _trajectory(scheduler, make_sampler(name, **kwargs), timesteps=[999, 800, 501, 200, 3]):
        assert (ours - theirs).abs().max().item() <= 1e-4 * max(1.0, theirs.abs().max().item())
    sampler = make_sampler("ddim")
    for bad in ([10, 20], [1000, 5], [], [5.5, 1]):
        with pytest.raises(ValueError, match="timesteps must"):
            sampler.set_timesteps(timesteps=bad)


def test_scheduler_options_refuse_what_they_cannot_reproduce():
    with pytest.raises(ValueError, match="use_karras_sigmas=True"):
        scheduler_options({"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True})
    with pytest.raises(ValueError, match="prediction_type='sample'"):
        scheduler_options({"_class_name": "DDIMScheduler", "prediction_type": "sample"})
    name, options = scheduler_options({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear"})
    assert name is None and options["schedule"] == "scaled_linear"
    # a hand-edited scheduler_config.json: its option named (it was int()'s or float()'s bare message)
    for option, value, kind in [("num_train_timesteps", "abc", "an integer"), ("steps_offset", None, "an integer"),
                                ("num_train_timesteps", 1000.5, "an integer"), ("beta_start", [1], "a number"),
                                ("beta_end", float("nan"), "a number")]:
        with pytest.raises(ValueError, match=rf"^scheduler {option}=.* must be {kind}$"):
            scheduler_options({"_class_name": "DDIMScheduler", option: value})
    _, options = scheduler_options({"_class_name": "DDIMScheduler", "num_train_timesteps": 1000.0})
    assert options["num_train_timesteps"] == 1000  # JSON may write an integer as 1000.0


def test_an_unreadable_file_in_a_folder_is_named(t2v_folder, tmp_path):
    """A config that is not JSON, weights that are not there: an error naming the file, never a decoder's or
    diffusers' traceback, and nothing written."""
    from stunet.cli import main

    _, folder = t2v_folder

    def broken(name: str, change) -> Path:
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        change(copy)
        return copy

    bad_config = broken("bad_config", lambda d: (d / "unet" / "config.json").write_text("{not json"))
    with pytest.raises(ValueError, match=r"unet/config.json' is not valid JSON \(.+\); give the folder a diffusers"):
        convert_folder(bad_config, tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(bad_config), "-o", str(tmp_path / "out"), "-q"])
    assert exit_.value.code == 2
    no_weights = broken("no_weights", lambda d: [p.unlink() for p in (d / "unet").glob("diffusion_pytorch_model*")])
    with pytest.raises(FileNotFoundError, match=r"could not load the UNet3DConditionModel in .*no_weights.*: "):
        convert_folder(no_weights, tmp_path / "out")
    bad_scheduler = broken("bad_scheduler", lambda d: (d / "scheduler" / "scheduler_config.json").write_bytes(b"\xff"))
    with pytest.raises(ValueError, match="scheduler_config.json' is not valid JSON"):
        convert_folder(bad_scheduler, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    convert_folder(folder, tmp_path / "out", dtype="fp32")
    (tmp_path / "out" / "scheduler" / "scheduler_config.json").write_text("")
    with pytest.raises(ValueError, match="scheduler_config.json' is not valid JSON .*or pass schedule="):
        stunet.Pipeline.from_pretrained(tmp_path / "out", device="cpu", progress=False)
    for part, named in (("vae", "VAE"), ("text_encoder", "CLIP text model")):
        for weights in (tmp_path / "out" / part).glob("*.safetensors"):
            weights.unlink()
        with pytest.raises(FileNotFoundError, match=rf"could not load the {named} in '.*{part}': "):
            stunet.Pipeline.from_pretrained(tmp_path / "out", device="cpu", progress=False, schedule={})


# -- the command line ------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stunet.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_convert_says_what_it_wrote_and_refuses_bad_folders(t2v_folder, tmp_path):
    """(The README test runs `stunet convert` and `stunet generate` from the converted folder as written.)"""
    _, folder = t2v_folder
    res = _cli("convert", str(folder), "-o", str(tmp_path / "m"), "-q")
    assert res.returncode == 0, res.stderr
    assert "in_channels 4, prediction eps" in res.stderr and "vae" in res.stderr
    # stunet's lines only: without accelerate, diffusers' loaders would warn on every load unless told not to
    # ask for low_cpu_mem_usage
    assert all(line.startswith("stunet: ") for line in res.stderr.splitlines() if line.strip()), res.stderr
    shown = _cli("convert", str(folder), "-o", str(tmp_path / "shown"))  # a progress line names each stage
    stages = shown.stderr.replace("\r", "\n")
    assert shown.returncode == 0 and "load the diffusers U-Net (1/4)" in stages and "copy vae, text_encoder" in stages
    assert f"convert {folder.name}: done" in stages, shown.stderr
    again = _cli("convert", str(folder), "-o", str(tmp_path / "m"))
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    missing = _cli("convert", str(tmp_path / "nowhere"), "-o", str(tmp_path / "n"))
    assert missing.returncode == 2 and "argument SRC_DIR: no folder" in missing.stderr
    res = _cli("generate", "a red fox", "--model", str(tmp_path / "m"), "-o", str(tmp_path / "fox.mp4"),
               "--ssr", str(tmp_path / "m"), "-q")
    assert res.returncode == 2 and "argument --ssr: --model" in res.stderr and "takes no SSR model" in res.stderr


def test_info_of_a_converted_latent_pipeline_takes_and_shows_pixels(t2v_folder, tmp_path, capsys):
    """`stunet info` reads a converted folder's --height/--width in pixels, as `stunet generate` does (in
    latents they would count 64 times the work of an SD VAE's 8x), and shows the latents they make."""
    import json

    from stunet.cli import main
    from stunet.info import analyse

    _, folder = t2v_folder
    convert_folder(folder, tmp_path / "m")
    config = stunet.STUNetConfig.load(tmp_path / "m")
    assert main(["info", str(tmp_path / "m"), "--height", "16", "--width", "32", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    want = analyse(config, "m", height=8, width=16)  # the fixture's VAE: 2 pixels per latent
    assert (got["height"], got["width"], got["pixel_scale"], got["flops"]) == (8, 16, 2, want.flops)
    assert main(["info", str(tmp_path / "m"), "--height", "16", "--width", "32"]) == 0
    assert "frames x 8 x 16 latents (16 x 32 pixels), 77 text tokens" in capsys.readouterr().out
    step = 2 * config.spatial_divisor
    with pytest.raises(SystemExit) as exit_:
        main(["info", str(tmp_path / "m"), "--height", str(step + 2)])
    assert exit_.value.code == 2
    assert (f"argument --height: height must be a positive multiple of {step} pixels for this latent model (its "
            f"VAE's 2 x the model's {config.spatial_divisor}), got {step + 2}") in capsys.readouterr().err
    assert main(["info", "tiny", "--height", "16", "--json"]) == 0  # a pixel model: positions are pixels
    assert json.loads(capsys.readouterr().out)["pixel_scale"] == 1
