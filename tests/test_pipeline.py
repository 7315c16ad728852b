"""The pipeline end to end on CPU (tiny presets): text -> base -> SSR with MultiDiffusion -> frames -> mp4."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from utils import randomize_temporal

import stunet
from stunet.pipeline.conditioning import Conditioning, resize_frames, video_frames
from stunet.pipeline import Pipeline, SSROptions
from stunet.pipeline.pipeline import stage_generator
from stunet.pipeline.text import tiny_random_t5
from stunet.pipeline.video import save_video

SSR_OVERRIDES = dict(in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
                     temporal_attn_depth=0, sample_size=16)


@pytest.fixture(scope="module")
def encoder():
    return tiny_random_t5(24)


def _models(in_channels=3):
    torch.manual_seed(0)
    base = randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", in_channels=in_channels)))
    ssr = randomize_temporal(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", **SSR_OVERRIDES)))
    return base, ssr


@pytest.fixture(scope="module")
def pipe(encoder):
    base, ssr = _models()
    return Pipeline(base, encoder, ssr, progress=False)


SMALL = dict(num_frames=8, height=8, width=8, num_inference_steps=3, ssr=SSROptions(window=4, overlap=1))


def test_text_to_base_to_ssr_to_mp4(pipe, tmp_path):
    res = pipe("a teddy bear surfing", seed=0, **SMALL)
    assert res.frames.shape == (1, 8, 16, 16, 3) and res.low_res_frames.shape == (1, 8, 8, 8, 3)
    assert res.frames.dtype == np.float32 and res.frames.min() >= 0 and res.frames.max() <= 1
    assert set(res.timings) == {"text", "base", "ssr", "decode"} and res.seed == 0
    av = pytest.importorskip("av")  # only decoding the mp4 needs PyAV
    path = save_video(res.frames[0], tmp_path / "out.mp4", fps=16)
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 8 and frames[0].shape == (16, 16, 3)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp2m"])
def test_same_seed_same_video_bit_for_bit(encoder, sampler):
    base, ssr = _models()
    pipe = Pipeline(base, encoder, ssr, sampler=sampler, progress=False)
    a = pipe(["a cat", "a dog"], seed=3, **SMALL).frames
    b = pipe(["a cat", "a dog"], generator=torch.Generator().manual_seed(3), **SMALL).frames
    c = pipe(["a cat", "a dog"], seed=4, **SMALL).frames
    assert a.shape == (2, 8, 16, 16, 3) and np.array_equal(a, b) and not np.array_equal(a, c)


def test_prompt_and_negative_prompt_and_guidance_matter(pipe):
    ref = pipe("a cat", seed=0, **SMALL).frames
    assert not np.array_equal(ref, pipe("a dog", seed=0, **SMALL).frames)
    assert not np.array_equal(ref, pipe("a cat", negative_prompt="blurry", seed=0, **SMALL).frames)
    assert not np.array_equal(ref, pipe("a cat", guidance_scale=1.0, seed=0, **SMALL).frames)
    assert not np.array_equal(ref, pipe("a cat", guidance_rescale=0.7, seed=0, **SMALL).frames)


def test_prompt_embeds_equal_encoded_prompt(pipe, encoder):
    tokens, _ = encoder.encode(["a cat", ""])
    with_embeds = pipe(prompt_embeds=tokens[:1], negative_prompt_embeds=tokens[1:], seed=0, **SMALL).frames
    assert with_embeds.shape == (1, 8, 16, 16, 3)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe("a cat", prompt_embeds=tokens[:1], **SMALL)


def test_output_types_and_callback(pipe):
    seen = []

    def callback(p, i, t, kw):
        seen.append((kw["stage"], i, t))
        return {"latents": kw["latents"]}

    pt = pipe("x", seed=0, output_type="pt", callback_on_step_end=callback, **SMALL).frames
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 8, 16, 16, 3)
    assert [s for s, _, _ in seen] == ["base"] * 3 + ["ssr"] * 3
    pil = pipe("x", seed=0, output_type="pil", **SMALL).frames
    assert len(pil) == 1 and len(pil[0]) == 8 and pil[0][0].size == (16, 16)
    np.testing.assert_allclose(np.asarray(pil[0][0]) / 255.0, pt[0, 0].numpy(), atol=1 / 255 + 1e-6)


def test_pil_output_without_pillow_is_refused_before_any_step(pipe, monkeypatch):
    """output_type='pil' needs Pillow (the [video] extra): without it, the call fails up front naming the extra,
    not with a bare ModuleNotFoundError after the whole generation."""
    import sys

    monkeypatch.setitem(sys.modules, "PIL", None)  # what `import PIL` meets without Pillow
    steps = []
    with pytest.raises(ImportError, match=r"^output_type='pil' needs Pillow: pip install 'stunet\[video\]' \(or "
                                          r"output_type='np'\)$"):
        pipe("x", seed=0, output_type="pil", callback_on_step_end=lambda *args: steps.append(args), **SMALL)
    assert steps == []
    assert pipe("x", seed=0, output_type="np", **SMALL).frames.shape == (1, 8, 16, 16, 3)


class _Cancelled(Exception):
    pass


@pytest.mark.parametrize("backend", ["reference", "fast"])
@pytest.mark.parametrize("stage", ["base", "ssr"])
def test_a_generation_cancelled_from_its_callback_leaves_the_pipeline_as_it_was(encoder, monkeypatch, backend,
                                                                                stage):
    """An exception raised by callback_on_step_end (a server cancelling a request) ends the call with it; the
    pipeline's next call makes the video a pipeline that never ran makes."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base, ssr = _models()

    def cancel(p, i, t, kw):
        if kw["stage"] == stage and i == 1:
            raise _Cancelled

    pipe = Pipeline(base, encoder, ssr, backend=backend, progress=False)
    with pytest.raises(_Cancelled):
        pipe("a cat", seed=0, callback_on_step_end=cancel, **SMALL)
    again = pipe("a dog", seed=1, **SMALL).frames
    fresh_base, fresh_ssr = _models()
    fresh = Pipeline(fresh_base, encoder, fresh_ssr, backend=backend, progress=False)
    assert np.array_equal(again, fresh("a dog", seed=1, **SMALL).frames)


def test_a_callback_may_return_nothing_a_dict_or_new_latents_and_nothing_else(pipe):
    """None, a dict without latents and a dict with the same latents in another memory layout (or dtype) all
    leave the video as it is; anything else is refused naming what the callback must return."""
    want = pipe("x", seed=0, **SMALL).frames
    for result in (lambda x: None, lambda x: {}, lambda x: {"latents": None},
                   lambda x: {"latents": x.double().transpose(3, 4).contiguous().transpose(3, 4)}):
        got = pipe("x", seed=0, callback_on_step_end=lambda p, i, t, kw: result(kw["latents"]), **SMALL).frames
        assert np.array_equal(got, want)
    for result, error, message in [(5, TypeError, "must return None or a dict"),
                                   ({"latents": 5}, ValueError, "returned latents int; they must be a tensor"),
                                   ({"latents": torch.zeros(1)}, ValueError, r"returned latents \(1,\)")]:
        with pytest.raises(error, match=message):
            pipe("x", seed=0, callback_on_step_end=lambda p, i, t, kw: result, **SMALL)


def test_base_only_pipeline_and_default_geometry(encoder):
    base, _ = _models()
    res = Pipeline(base, encoder, progress=False)("x", num_inference_steps=2, seed=0)
    assert res.frames.shape == (1, 8, 16, 16, 3) and res.low_res_frames is None


@pytest.mark.parametrize("guidance", [dict(), dict(guidance_scale=3.0, guidance_rescale=0.7)],
                         ids=["unguided", "guided-rescaled"])
def test_windowed_ssr_equals_single_window_for_framewise_ssr(encoder, guidance):
    """With an SSR model whose temporal modules are fresh (frame-wise), windows change nothing, with guidance
    and guidance rescale too: its statistics are per clip (a per-window std would differ between plans)."""
    base, _ = _models()
    torch.manual_seed(5)
    ssr = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", **SSR_OVERRIDES))
    pipe = Pipeline(base, encoder, ssr, progress=False)
    a = pipe("x", seed=1, **{**SMALL, "ssr": SSROptions(window=3, overlap=1, **guidance)}).frames
    b = pipe("x", seed=1, **{**SMALL, "ssr": SSROptions(window=8, overlap=0, **guidance)}).frames
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=0)


def test_an_ssr_model_without_noise_conditioning_runs_and_refuses_a_noise_level(encoder):
    """An SSR model with noise_aug=False takes no noise level: the stage calls it without one (it was handed
    noise_level=0 and refused it, after the base stage), and SSROptions.noise_level > 0 is refused before any
    compute."""
    base, _ = _models()
    torch.manual_seed(1)
    ssr = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", **{**SSR_OVERRIDES, "noise_aug": False}))
    pipe = Pipeline(base, encoder, ssr, progress=False)
    assert pipe("x", seed=0, **SMALL).frames.shape == (1, 8, 16, 16, 3)
    calls = []
    hook = pipe.base_stage.backend.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"SSROptions.noise_level=100 needs an SSR model trained with noise "
                                             r"augmentation \(config.noise_aug=True\)"):
            pipe("x", seed=0, **{**SMALL, "ssr": SSROptions(noise_level=100)})
    finally:
        hook.remove()
    assert not calls


@pytest.mark.parametrize("kwargs,message", [
    ({"num_frames": 7}, "num_frames must be a positive multiple of 2"),
    ({"height": 6}, "height must be a positive multiple of 4"),
    ({"output_type": "latent"}, "output_type must be one of"),
    ({"strength": 0.0}, r"strength must be in \(0, 1\]"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0"),
    ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ({"ssr": SSROptions(window=4, overlap=4)}, r"overlap \(4\) must be smaller than window \(4\)"),
    ({"sampler": "euler"}, "sampler must be one of"),
    ({"sampler": stunet.samplers.DDIM(prediction="eps")}, "sampler has prediction='eps' but the model was"),
])
def test_bad_call_arguments(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("x", **{**SMALL, **kwargs})


@pytest.mark.parametrize("kwargs,message", [
    ({"guidance_scale": float("nan")}, "guidance_scale must be finite"),
    ({"guidance_scale": float("inf")}, "guidance_scale must be finite"),
    ({"guidance_rescale": 1.5}, r"guidance_rescale must be in \[0, 1\]"),
    ({"strength": float("nan")}, "strength must be finite"),
    ({"num_inference_steps": 2.5}, "num_inference_steps must be an integer"),
    ({"seed": 2 ** 64}, r"seed must be an integer in \[0, 2\*\*63\)"),
    ({"ssr": SSROptions(window=4)}, None),  # a valid control: the call goes through
])
def test_non_finite_and_out_of_range_numbers_fail_before_any_compute(pipe, kwargs, message):
    calls = []
    hook = pipe.base_stage.backend.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        if message is None:
            pipe("x", **{**SMALL, **kwargs})
            assert calls
            return
        with pytest.raises((ValueError, TypeError), match=message):
            pipe("x", **{**SMALL, **kwargs})
        assert not calls  # refused before the model ran
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="SSROptions.guidance_scale must be finite"):
        SSROptions(guidance_scale=float("nan"))


def test_sampler_objects_are_accepted_and_left_untouched(encoder):
    base, ssr = _models()
    sampler = stunet.samplers.DPMSolverPP2M(schedule="cosine", prediction="v", spacing="trailing")
    by_object = Pipeline(base, encoder, ssr, sampler=sampler, progress=False)("x", seed=0, **SMALL).frames
    assert sampler.num_inference_steps == 0  # the pipeline stepped its own copies
    by_name = Pipeline(base, encoder, ssr, sampler="dpmpp2m", progress=False)
    leading = by_name("x", seed=0, **SMALL).frames
    assert not np.array_equal(by_object, leading)  # the object's trailing spacing was used
    per_call = by_name("x", seed=0, sampler=sampler, **SMALL)  # the base stage's sampler for one call
    assert np.array_equal(per_call.low_res_frames, Pipeline(base, encoder, ssr, sampler=sampler, progress=False)(
        "x", seed=0, **SMALL).low_res_frames)
    assert sampler.num_inference_steps == 0


def test_help_documents_every_argument():
    import inspect
    import pydoc

    text = pydoc.render_doc(Pipeline, renderer=pydoc.plaintext)
    for method in (Pipeline.__init__, Pipeline.__call__):
        names = [p for p in inspect.signature(method).parameters if p != "self"]
        doc = (Pipeline.__doc__ if method is Pipeline.__init__ else method.__doc__) or ""
        missing = [n for n in names if n not in doc]
        assert not missing, f"{method.__qualname__} does not document {missing}"
    assert "from_pretrained" in text and Pipeline.from_pretrained.__doc__


def test_the_package_is_typed_and_the_calls_keep_their_signatures():
    """PEP 561: the package ships py.typed, so a product's type checker reads its annotations; the decorated
    calls keep theirs (their decorator is typed to return the method's own type, for static checkers)."""
    import importlib.resources
    import typing

    from stunet.pipeline import PipelineOutput

    assert importlib.resources.files("stunet").joinpath("py.typed").is_file()
    for method, returns in ((Pipeline.__call__, PipelineOutput), (Pipeline.encode_prompt, tuple[torch.Tensor,
                                                                                                  torch.Tensor])):
        assert typing.get_type_hints(method)["return"] == returns


def test_a_pipeline_shows_its_models_in_one_line(pipe):
    assert re.fullmatch(r"Pipeline\(base=<3-channel STUNet, \d+\.\d M parameters, torch\.float32>, "
                        r"ssr=<6-channel STUNet, \d+\.\d M parameters, torch\.float32>, backend='reference', "
                        r"device='cpu'\)", repr(pipe)), repr(pipe)


def test_bad_construction(encoder):
    base, ssr = _models()
    with pytest.raises(ValueError, match="base_model is an SSR model"):
        Pipeline(ssr, encoder)
    with pytest.raises(ValueError, match="text_encoder gives 16-wide tokens"):
        Pipeline(base, tiny_random_t5(16))
    with pytest.raises(ValueError, match="backend must be one of"):
        Pipeline(base, encoder, backend="turbo")
    with pytest.raises(ValueError, match="no text encoder"):
        Pipeline(base, None, progress=False)("x", **SMALL)
    with pytest.raises(TypeError, match="backend_options must be a dict of the backend's keyword options"):
        Pipeline(base, encoder, backend_options="max_batch=1")
    with pytest.raises(ValueError, match=r"the fast backend takes no option 'max_batc' \(its options: graphs, "
                                         r"max_batch, max_graph_shapes\)"):
        Pipeline(base, encoder, backend="fast", backend_options={"max_batc": 1})
    with pytest.raises(ValueError, match=r"the reference backend takes no option 'max_batch' \(its options: none"):
        Pipeline(base, encoder, backend_options={"max_batch": 1})
    with pytest.raises(TypeError, match=r"text_encoder must be a text encoder \(.encode\(prompts\) and .dim"):
        Pipeline(base, "t5_dir")  # a folder is for from_pretrained
    with pytest.raises(TypeError, match="schedule must be a dict of sampler settings"):
        Pipeline(base, encoder, schedule="linear")
    with pytest.raises(ValueError, match=r"schedule \{'beta_schedule': 'linear'\} is not a sampler's settings"):
        Pipeline(base, encoder, schedule={"beta_schedule": "linear"})  # diffusers' name: scheduler_options maps it
    with pytest.raises(TypeError, match="progress must be True or False, got 'no'"):  # "no" would read as true
        Pipeline(base, encoder, progress="no")
    with pytest.raises(TypeError, match="progress must be True or False or None, got 'no'"):
        Pipeline(base, encoder)("x", progress="no", **SMALL)
    default, ddim = (Pipeline(base, encoder, sampler=s, progress=False) for s in (None, "ddim"))
    assert np.array_equal(default("x", seed=0, **SMALL).frames, ddim("x", seed=0, **SMALL).frames)


def test_text_and_embeddings_are_not_mixed(pipe, encoder):
    """A negative prompt goes with prompts, negative embeddings with prompt_embeds: the other pairs are refused,
    not ignored."""
    tokens = torch.randn(1, 4, encoder.dim)
    with pytest.raises(ValueError, match="negative_prompt is text, which prompt_embeds= skips encoding"):
        pipe(prompt_embeds=tokens, negative_prompt="blurry", **SMALL)
    with pytest.raises(ValueError, match="negative_prompt_embeds goes with prompt_embeds="):
        pipe("x", negative_prompt_embeds=tokens, **SMALL)


def test_encode_prompt_takes_one_negative_per_prompt(pipe):
    tokens, mask = pipe.encode_prompt(["a cat", "a dog"], ("", "blurry"))
    assert tokens.shape[0] == mask.shape[0] == 4  # [prompts; negatives]
    for prompts, negative, error, message in [("a cat", [""], TypeError, "prompts must be a list of strings"),
                                              (["a cat"], None, TypeError, "negative must be a list of strings"),
                                              (["a cat"], ["", ""], ValueError, "one prompt for each of the 1")]:
        with pytest.raises(error, match=message):
            pipe.encode_prompt(prompts, negative)


def test_video_arguments_are_arrays_and_a_path_names_the_reader(pipe):
    with pytest.raises(TypeError, match=r"video must be an array \(numpy or torch\), got the path 'low.mp4': read "
                                        r"the file first with stunet.read_frames"):
        pipe.upscale("low.mp4", "x", num_inference_steps=1)
    with pytest.raises(TypeError, match="image must be an array of numbers, got list of dtype <U1"):
        Conditioning.image_to_video(["a", "b"], 8)


def test_from_pretrained_and_style(tmp_path, encoder):
    base, ssr = _models()
    base.save_pretrained(tmp_path / "base")
    ssr.save_pretrained(tmp_path / "ssr")
    pipe = Pipeline.from_pretrained(tmp_path / "base", ssr=tmp_path / "ssr", text_encoder=encoder, device="cpu",
                                    progress=False)
    ref = Pipeline(base, encoder, ssr, progress=False)
    assert np.array_equal(pipe("x", seed=0, **SMALL).frames, ref("x", seed=0, **SMALL).frames)
    torch.manual_seed(9)
    style = stunet.STUNet(base.config)
    styled = pipe.with_style(style, 0.8)
    assert not np.array_equal(styled("x", seed=0, **SMALL).frames, ref("x", seed=0, **SMALL).frames)


def test_float16_on_the_cpu_is_float32_by_default_and_said_when_asked_for(tmp_path, encoder, caplog):
    """PyTorch's CPU kernels emulate float16 (15 to 50 times slower): from_pretrained computes a float16 file in
    float32 on the CPU unless dtype= says otherwise (as stunet generate does), and a pipeline of float16 models on
    the CPU says what it costs."""
    base, ssr = _models()
    base.half().save_pretrained(tmp_path / "base")
    ssr.half().save_pretrained(tmp_path / "ssr")
    with caplog.at_level("WARNING", logger="stunet"):
        pipe = Pipeline.from_pretrained(tmp_path / "base", ssr=tmp_path / "ssr", text_encoder=encoder, device="cpu")
    assert pipe.base.dtype == pipe.ssr.dtype == torch.float32 and "float16" not in caplog.text
    with caplog.at_level("WARNING", logger="stunet"):
        pipe = Pipeline.from_pretrained(tmp_path / "base", text_encoder=encoder, device="cpu", dtype=torch.float16)
    assert pipe.base.dtype == torch.float16
    assert "the base model computes in float16 on the CPU, where PyTorch's kernels emulate float16" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="stunet"):
        Pipeline(base, encoder, ssr.half())
    assert "the base and SSR models compute in float16 on the CPU" in caplog.text


def test_from_pretrained_refuses_bad_options_before_it_reads_a_file(tmp_path, encoder, monkeypatch):
    """Options that need no model, missing folders and unknown keywords are refused before any weights load (a
    bad sampler name used to surface after minutes of loading a large model)."""
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(stunet.STUNet, "from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))
    for args, options, error, message in [
        ((), dict(backend="fastest"), ValueError, "backend must be one of"),
        ((), dict(sampler="euler"), ValueError, "euler"),
        ((), dict(runtime="rust"), ValueError, "runtime must be one of"),
        ((), dict(progress="no"), TypeError, "progress must be True or False"),
        ((), dict(schedule={"steps": 3}), ValueError, "is not a sampler's settings"),
        ((), dict(backend_options=[("max_batch", 1)]), TypeError, "backend_options must be a dict"),
        ((), dict(samplr="ddim"), TypeError, "unexpected keyword argument.* samplr; it takes backend_options"),
        ((tmp_path / "none",), {}, FileNotFoundError, r"no model folder at .*none' \(ssr=\)"),
        ((), dict(text_encoder=tmp_path / "t5"), FileNotFoundError, "has no config.json"),
    ]:
        with pytest.raises(error, match=message):
            Pipeline.from_pretrained(tmp_path / "base", *args, device="cpu", **options)
    with pytest.raises(TypeError, match="base must be the path of a model folder, got STUNet"):
        Pipeline.from_pretrained(stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")), text_encoder=encoder)


# -- conditional modes --------------------------------------------------------------------------------------------
def test_conditioning_tensors_of_each_mode():
    g = np.random.default_rng(0)
    image = g.random((8, 8, 3), dtype=np.float32)
    img = torch.from_numpy(image).permute(2, 0, 1) * 2 - 1
    region = np.zeros((8, 8), dtype=np.float32)
    region[2:5, 3:6] = 1

    c = Conditioning.image_to_video(image, 4)
    assert c.video.shape == (1, 3, 4, 8, 8) and c.mask.shape == (1, 1, 4, 8, 8)
    assert torch.equal(c.video[0, :, 0], img) and not c.video[:, :, 1:].any()
    assert c.mask[:, :, 0].eq(1).all() and not c.mask[:, :, 1:].any()

    video = g.random((4, 8, 8, 3), dtype=np.float32)
    c = Conditioning.inpaint(video, region)
    keep = torch.from_numpy(1 - region)
    assert torch.equal(c.mask[0, 0], keep.expand(4, 8, 8))  # M = 0 inside the region on every frame
    assert torch.equal(c.video[0], (torch.from_numpy(video).permute(3, 0, 1, 2) * 2 - 1) * keep)

    c = Conditioning.cinemagraph(image, region, 4)
    assert c.mask[0, 0, 0].eq(1).all()  # frame 0 fully known
    assert all(torch.equal(c.mask[0, 0, f], keep) for f in range(1, 4))  # elsewhere known outside the region
    assert torch.equal(c.video[0, :, 0], img)
    assert torch.equal(c.video[0, :, 3], img * keep)

    c = Conditioning.unconditional(2, 4, 8, 8)
    assert not c.video.any() and not c.mask.any()


@pytest.mark.parametrize("kwargs,error,message", [
    ({"prompt_embeds": torch.zeros(0, 7, 24)}, ValueError, r"prompt_embeds \(0, 7, 24\) is empty"),
    ({"prompt_embeds": torch.zeros(1, 7, 24, dtype=torch.long)}, TypeError,
     "prompt_embeds must be a floating-point tensor, got torch.int64"),
    ({"prompt_embeds": torch.zeros(1, 7, 24), "negative_prompt_embeds": torch.zeros(1, 7, 24, device="meta")},
     ValueError, "negative_prompt_embeds is a meta tensor, which holds no values"),
    ({"prompt": "x", "latents": torch.zeros(1, 3, 8, 8, 8, dtype=torch.long)}, TypeError,
     "latents must be a floating-point tensor"),
    ({"prompt": "x", "init_video": torch.zeros(1, 3, 8, 8, 8, dtype=torch.bool)}, TypeError,
     "init_video must be a floating-point tensor"),
    ({"prompt": "x", "negative_prompt": True}, ValueError, "negative_prompt must be a string or a list of 1"),
    ({"prompt": ["x", "y"], "negative_prompt": ("a", "b")}, None, None),  # a valid control: a tuple of two
])
def test_bad_tensors_and_prompts_fail_before_any_compute(pipe, kwargs, error, message):
    calls = []
    hook = pipe.base_stage.backend.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        if error is None:
            assert pipe(**{**SMALL, **kwargs}).frames.shape[0] == 2 and calls
            return
        with pytest.raises(error, match=message):
            pipe(**{**SMALL, **kwargs})
        assert not calls
    finally:
        hook.remove()


ODD = [None, True, -1, 0, 7, 2.5, float("nan"), "", "8", [], ["x"], ("x", "y"), 10 ** 30, torch.tensor(2),
       torch.zeros(2, 2)]


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_call_runs_or_is_refused_naming_its_argument(pipe, data):
    """Whatever mix of values the call's arguments get: a video, or a TypeError / ValueError naming one of them,
    raised before any compute; never an error from deep inside."""
    kwargs = {}
    for name, valid in [("prompt", st.sampled_from(["x", ["x", "y"], ""])),
                        ("negative_prompt", st.sampled_from(["no", ["a", "b"]])),
                        ("num_frames", st.sampled_from([4, 8])), ("height", st.just(8)), ("width", st.just(8)),
                        ("num_inference_steps", st.sampled_from([1, 2])), ("guidance_scale", st.sampled_from([1, 3.5])),
                        ("guidance_rescale", st.sampled_from([0.0, 0.7])),
                        ("sampler", st.sampled_from(["ddim", "ddpm", "dpmpp2m"])), ("seed", st.sampled_from([0, 2])),
                        ("output_type", st.sampled_from(["np", "pt", "pil"])), ("progress", st.just(False))]:
        kind = data.draw(st.sampled_from(["absent", "valid", "valid", "valid", "valid", "odd"]), label=name)
        if kind != "absent":
            kwargs[name] = data.draw(valid if kind == "valid" else st.sampled_from(ODD), label=name)
    for name, size in (("num_frames", 8), ("height", 8), ("width", 8), ("num_inference_steps", 2)):
        kwargs.setdefault(name, size)
    calls = []
    hook = pipe.base_stage.backend.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res = pipe(**kwargs, ssr=SSROptions(window=4, overlap=1, num_inference_steps=1))
    except (TypeError, ValueError) as e:
        assert not calls and any(name in str(e) for name in [*kwargs, "prompt"]), (e, kwargs)
        return
    finally:
        hook.remove()
    assert len(res.frames) == (len(kwargs["prompt"]) if isinstance(kwargs.get("prompt"), (list, tuple)) else 1)


def test_conditioning_input_errors():
    with pytest.raises(ValueError, match=r"image must be \(H, W, 3\)"):
        Conditioning.image_to_video(np.zeros((8, 8)), 4)
    with pytest.raises(ValueError, match=r"must hold values in \[0, 1\]"):
        Conditioning.image_to_video(np.full((8, 8, 3), 2.0), 4)
    with pytest.raises(ValueError, match="region must be binary"):
        Conditioning.cinemagraph(np.zeros((8, 8, 3)), np.full((8, 8), 0.5), 4)
    with pytest.raises(ValueError, match=r"region must be \(H, W\)"):
        Conditioning.inpaint(np.zeros((4, 8, 8, 3)), np.zeros((7, 7)))
    nan_image = torch.zeros(8, 8, 3)
    nan_image[0, 0, 0] = float("nan")  # min() and max() are NaN: only a finiteness check sees it
    with pytest.raises(ValueError, match="image contains NaN or inf"):
        Conditioning.image_to_video(nan_image, 4)
    with pytest.raises(ValueError, match="video contains NaN or inf"):
        Conditioning.inpaint(nan_image[None].expand(4, 8, 8, 3), np.zeros((8, 8)))


def test_conditional_modes_run_on_a_7_channel_model(encoder):
    base, _ = _models(in_channels=7)
    pipe = Pipeline(base, encoder, progress=False)
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    region = np.zeros((16, 16), dtype=np.float32)
    region[4:12, 4:12] = 1
    kw = dict(num_inference_steps=2, seed=0)
    assert pipe.image_to_video(image, "x", num_frames=4, **kw).frames.shape == (1, 4, 16, 16, 3)
    assert pipe.cinemagraph(image, region, "x", num_frames=4, **kw).frames.shape == (1, 4, 16, 16, 3)
    video = np.random.default_rng(1).random((4, 16, 16, 3), dtype=np.float32)
    assert pipe.inpaint(video, region, "x", **kw).frames.shape == (1, 4, 16, 16, 3)
    assert pipe("x", num_frames=4, **kw).frames.shape == (1, 4, 16, 16, 3)  # text-to-video: C = 0, M = 0
    for frames in (-1, 0, 3):  # the frames an image is animated into are checked like a call's num_frames
        with pytest.raises(ValueError, match=f"num_frames must be a positive multiple of 2 .* got {frames}"):
            pipe.image_to_video(image, "x", num_frames=frames, **kw)
        with pytest.raises(ValueError, match=f"num_frames must be a positive multiple of 2 .* got {frames}"):
            pipe.cinemagraph(image, region, "x", num_frames=frames, **kw)


def test_the_modes_check_their_sizes_and_conditioning_before_using_them(encoder):
    """A mode's sizes are checked before they are compared with its inputs' or sized into tensors (a tensor there
    was "Boolean value of Tensor ... is ambiguous", 2**70 frames a C++ overflow from torch.zeros), and a
    conditioning that is not one is named."""
    base, _ = _models(in_channels=7)
    pipe = Pipeline(base, encoder, progress=False)
    image, video, region = torch.rand(16, 16, 3), torch.rand(4, 16, 16, 3), torch.ones(16, 16)
    big = torch.zeros(1, 3, 4, 16, 16)
    for call, name in [(lambda **kw: pipe.video_to_video(video, "x", **kw), "height"),
                       (lambda **kw: pipe.inpaint(video, region, "x", **kw), "width"),
                       (lambda **kw: pipe.upscale(video, "x", **kw), "num_frames"),
                       (lambda **kw: pipe.image_to_video(image, "x", **kw), "num_frames")]:
        with pytest.raises(ValueError, match=rf"^{name} must be a positive .* got a tensor of shape \(1, 3, 4, 16, "):
            call(**{name: big})
    for call in (lambda: pipe.image_to_video(image, "x", num_frames=2 ** 70),
                 lambda: pipe.cinemagraph(image, region, "x", num_frames=2 ** 70),
                 lambda: Conditioning.image_to_video(image, 2 ** 70)):
        with pytest.raises(ValueError, match=r"num_frames x height x width = 1180591620717411303424 x 16 x 16 is "
                                             r"past any device's memory"):
            call()
    with pytest.raises(ValueError, match="num_frames must be a positive integer, got 2.0"):
        Conditioning.cinemagraph(image, region, 2.0)
    with pytest.raises(TypeError, match=r"conditioning must be a stunet.Conditioning \(.*\), got list"):
        pipe("x", conditioning=[], num_frames=4, num_inference_steps=1)


def test_3_channel_model_refuses_conditional_modes(encoder):
    base, _ = _models()
    pipe = Pipeline(base, encoder, progress=False)
    image = np.zeros((16, 16, 3), dtype=np.float32)
    region = np.ones((16, 16), dtype=np.float32)
    for run, mode in ((lambda: pipe.image_to_video(image, "x", num_frames=4), "image_to_video"),
                      (lambda: pipe.cinemagraph(image, region, "x", num_frames=4), "cinemagraph"),
                      (lambda: pipe.inpaint(np.zeros((4, 16, 16, 3)), region, "x"), "inpaint")):
        with pytest.raises(ValueError, match=f"{mode} needs a conditional model \\(in_channels=7"):
            run()


def test_video_to_video_strength(encoder):
    base, _ = _models()
    pipe = Pipeline(base, encoder, progress=False)
    video = np.random.default_rng(2).random((4, 16, 16, 3), dtype=np.float32)
    steps = []
    cb = lambda p, i, t, kw: steps.append(t)  # noqa: E731
    res = pipe.video_to_video(video, "x", strength=0.5, num_inference_steps=8, seed=0, callback_on_step_end=cb)
    assert res.frames.shape == (1, 4, 16, 16, 3) and len(steps) == 4  # half the schedule
    low = pipe.video_to_video(video, "x", strength=0.25, num_inference_steps=8, seed=0).frames
    high = pipe.video_to_video(video, "x", strength=1.0, num_inference_steps=8, seed=0).frames
    assert np.abs(low - video).mean() < np.abs(high - video).mean()  # less noise, closer to the input


def test_video_to_video_on_a_cascade_edits_at_the_base_size_and_keeps_the_videos(pipe):
    """A cascade's own output (the SSR's size) goes in, is edited at the base size and comes out at its size."""
    cfg = pipe.ssr.config
    big = 8 * cfg.sample_size // cfg.low_res_size
    video = np.random.default_rng(4).random((8, big, big, 3), dtype=np.float32)
    options = dict(num_inference_steps=2, ssr=SSROptions(window=4, overlap=1), seed=0)
    res = pipe.video_to_video(video, "x", **options)
    assert res.frames.shape == (1, 8, big, big, 3) and res.low_res_frames.shape == (1, 8, 8, 8, 3)
    at_base = pipe.video_to_video(video, "x", height=8, width=8, **options)  # the same base size, asked for
    assert np.array_equal(res.frames, at_base.frames)
    with pytest.raises(ValueError, match=f"the video is {big - 1}x{big}, which this cascade does not make"):
        pipe.video_to_video(video[:, 1:], "x", **options)


@settings(max_examples=60, deadline=None)
@given(height=st.integers(1, 200), width=st.integers(1, 200))
def test_a_cascades_base_size_is_the_one_its_ssr_raises_to_the_videos(pipe, height, width):
    """The base size video-to-video edits a cascade's video at: the one base size (sides in multiples of the base
    model's divisor) from which the SSR stage makes exactly height x width; none: an error asking for one."""
    cfg, spatial = pipe.ssr.config, pipe.base.config.spatial_divisor
    makes = {pipe.ssr_stage.output_size(h, h)[0]: h for h in range(spatial, 201, spatial)}
    if height in makes and width in makes:
        assert pipe._base_size(height, width) == (makes[height], makes[width])
    else:
        with pytest.raises(ValueError, match=f"the video is {height}x{width}, which this cascade does not make"):
            pipe._base_size(height, width)
    assert cfg.sample_size // cfg.low_res_size == 2


def test_upscale_runs_the_ssr_stage_alone(pipe, encoder):
    low = np.random.default_rng(5).random((8, 8, 8, 3), dtype=np.float32)
    calls = []
    options = dict(ssr=SSROptions(window=4, overlap=1, num_inference_steps=2), seed=3,
                   callback_on_step_end=lambda p, i, t, kw: calls.append(kw["stage"]))
    res = pipe.upscale(low, "x", **options)
    assert res.frames.shape == (1, 8, 16, 16, 3) and calls == ["ssr", "ssr"] and "base" not in res.timings
    assert np.abs(res.low_res_frames[0] - low).max() < 1e-6
    assert np.array_equal(pipe.upscale(low, "x", **options).frames, res.frames)  # a seed gives the same video
    with pytest.raises(ValueError, match=r"height must be the video's \(8\) or None"):
        pipe.upscale(low, "x", height=16)
    with pytest.raises(ValueError, match="low_res_video replaces the base stage, which init_video is for"):
        pipe("x", num_frames=8, height=8, width=8, low_res_video=torch.zeros(1, 3, 8, 8, 8),
             init_video=torch.zeros(1, 3, 8, 8, 8))
    with pytest.raises(ValueError, match=r"low_res_video must be a tensor of shape \(1, 3, 8, 8, 8\)"):
        pipe("x", num_frames=8, height=8, width=8, low_res_video=torch.zeros(1, 3, 8, 4, 4))
    base, _ = _models()
    with pytest.raises(ValueError, match="this pipeline has no SSR model to raise it"):
        Pipeline(base, encoder, progress=False).upscale(low, "x")


def test_upscale_repeats_the_ssr_stage_of_a_generation(pipe):
    """The SSR stage's noise depends on the seed alone: not on the base stage's steps or sampler (DDPM draws at
    every step), and ``upscale`` of a generation's low-res frames with its seed gives its video."""
    options = dict(SMALL, ssr=SSROptions(window=4, overlap=1, num_inference_steps=2, sampler="ddpm"), seed=11)
    res = pipe("x", **options)
    again = pipe.upscale(res.low_res_frames[0], "x", **options)
    assert np.abs(again.frames - res.frames).max() < 1e-4
    other_base = pipe("x", **{**options, "sampler": "ddpm", "num_inference_steps": 4})
    assert np.abs(other_base.low_res_frames - res.low_res_frames).max() > 1e-2  # another base video,
    same_noise = pipe.upscale(other_base.low_res_frames[0], "x", **options)
    assert np.abs(same_noise.frames - other_base.frames).max() < 1e-4  # raised with the same SSR noise
    with_generator = pipe("x", **{**options, "seed": None}, generator=torch.Generator().manual_seed(11))
    assert np.array_equal(with_generator.frames, res.frames)  # seed=s is a fresh generator seeded with s
    gen = torch.Generator().manual_seed(0)
    assert stage_generator(gen, "ssr").initial_seed() != stage_generator(gen, "base").initial_seed()
    torch.randn(1, generator=gen)
    assert stage_generator(gen, "ssr").initial_seed() != stage_generator(torch.Generator().manual_seed(0),
                                                                         "ssr").initial_seed()


def test_a_resized_conditioning_keeps_known_colours_and_never_shrinks_the_region():
    video = np.full((4, 16, 16, 3), 0.75, dtype=np.float32)  # 0.5 in model space
    region = np.zeros((16, 16), dtype=np.float32)
    region[5:11, 4:12] = 1
    small = Conditioning.inpaint(video, region).resized(8, 8)
    assert small.video.shape == (1, 3, 4, 8, 8) and small.mask.shape == (1, 1, 4, 8, 8)
    generate = small.mask[0, 0, 0] == 0
    assert generate[2:6, 2:6].all()  # the region, halved, is still generated
    assert generate.sum() < 64 and (generate.sum(dim=0) > 0).sum() <= 6  # ... with at most a pixel of margin
    assert torch.equal(small.video, 0.5 * small.mask.expand_as(small.video))  # known pixels keep their colour
    frame0 = Conditioning.image_to_video(np.full((16, 16, 3), 0.25, dtype=np.float32), 4).resized(8, 8)
    assert frame0.mask[:, :, 0].eq(1).all() and frame0.mask[:, :, 1:].eq(0).all()
    assert torch.allclose(frame0.video[:, :, 0], torch.tensor(-0.5)) and frame0.video[:, :, 1:].eq(0).all()


def test_conditional_modes_on_a_cascade_take_inputs_at_its_output_size(encoder):
    base, ssr = _models(in_channels=7)
    pipe = Pipeline(base, encoder, ssr, progress=False)
    image = np.random.default_rng(0).random((16, 16, 3), dtype=np.float32)
    options = dict(num_frames=4, num_inference_steps=2, ssr=SSROptions(window=4, overlap=1), seed=0)
    res = pipe.image_to_video(image, "x", **options)
    assert res.frames.shape == (1, 4, 16, 16, 3) and res.low_res_frames.shape == (1, 4, 8, 8, 3)
    assert pipe.image_to_video(image, "x", height=16, width=16, **options).frames.shape == (1, 4, 32, 32, 3)


def test_video_to_video_resizes_the_video_to_the_size_asked_for(encoder):
    base, _ = _models()
    pipe = Pipeline(base, encoder, progress=False)
    video = np.random.default_rng(3).random((4, 8, 24, 3), dtype=np.float32)
    res = pipe.video_to_video(video, "x", height=16, width=32, num_inference_steps=4, seed=0)
    assert res.frames.shape == (1, 4, 16, 32, 3)
    init = resize_frames(video_frames(video), 16, 32)
    assert init.shape == (1, 3, 4, 16, 32) and -1 <= init.min() and init.max() <= 1
    same = pipe(["x"], init_video=init, strength=0.6, num_frames=4, height=16, width=32, num_inference_steps=4, seed=0)
    assert np.array_equal(res.frames, same.frames)
    with pytest.raises(ValueError, match=r"num_frames must be the inputs' frame count \(4\)"):
        pipe.video_to_video(video, "x", num_frames=8)
    with pytest.raises(ValueError, match="width must be a positive multiple of 4"):
        pipe.video_to_video(video, "x", width=30)
    with pytest.raises(ValueError, match="strength 0.1 leaves no denoising step of 8"):  # int(0.8) = 0 steps
        pipe.video_to_video(video, "x", strength=0.1, num_inference_steps=8)


def _out_of_memory(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


@pytest.mark.parametrize("backend,options,stage,says,not_says", [
    ("reference", {}, "base", ["the base stage (1 video(s) of 8 frames of 8x8, reference backend)",
                               "--backend fast --max-batch 1", "fewer frames or a smaller size"], []),
    ("fast", {}, "base", ["fast backend", "backend_options={'max_batch': 1} (--max-batch 1)"], ["--backend fast"]),
    ("fast", {"max_batch": 1}, "base", ["fewer frames or a smaller size"], ["max_batch"]),
    ("reference", {}, "ssr", ["the SSR stage (1 video(s) of 8 frames of 16x16, 4 window(s) of 4 frames per call",
                              "ssr=SSROptions(batch_size=1) (--ssr-batch 1)", "--backend fast --max-batch 1"], []),
], ids=["reference-base", "fast-base", "fast-sliced-base", "reference-ssr"])
def test_out_of_memory_in_a_stage_says_where_and_how_to_need_less(encoder, monkeypatch, backend, options, stage,
                                                                  says, not_says):
    """The error keeps its type and the allocator's message, and ends with the stage it happened in and the
    ways to need less memory that the pipeline's settings leave."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base, ssr = _models()
    pipe = Pipeline(base, encoder, ssr, backend=backend, backend_options=options, progress=False)
    target = pipe.base_stage if stage == "base" else pipe.ssr_stage
    monkeypatch.setattr(target.backend, "forward", _out_of_memory)
    with pytest.raises(torch.OutOfMemoryError) as raised:
        pipe("a teddy bear surfing", seed=0, **SMALL)
    message = str(raised.value)
    assert message.startswith("CUDA out of memory. Tried to allocate 2.00 GiB\nstunet: out of memory in ")
    assert all(s in message for s in says), message
    assert not any(s in message for s in not_says), message


def test_the_cpu_allocators_refusal_is_an_out_of_memory_error_too(pipe, monkeypatch):
    """PyTorch's CPU allocator refuses with a plain RuntimeError; in a stage it becomes the OutOfMemoryError (still a
    RuntimeError) that says how much, where and how to need less, as on a GPU. Other RuntimeErrors pass as they
    are, and a size no tensor could have is refused before any allocation."""
    def refused(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 412316860416 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr("stunet.pipeline.stages.Sampler.draw_noise", refused)  # the stage's first allocation
    with pytest.raises(torch.OutOfMemoryError) as raised:
        pipe("x", seed=0, **SMALL)
    assert str(raised.value).startswith("the CPU could not allocate 384 GiB\nstunet: out of memory in the base stage")
    assert isinstance(raised.value.__cause__, RuntimeError)

    def broken(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr("stunet.pipeline.stages.Sampler.draw_noise", broken)
    with pytest.raises(RuntimeError, match="^something else$") as raised:
        pipe("x", seed=0, **SMALL)
    assert type(raised.value) is RuntimeError
    with pytest.raises(ValueError, match=r"num_frames x height x width = 8 x 8 x 8796093022208 is past any device"):
        pipe("x", **{**SMALL, "width": 2 ** 43})


def test_text_rows_are_ordinary_tensors_under_inference_mode(encoder, monkeypatch):
    """Under torch.inference_mode the pipeline's guidance rows are still ordinary tensors, whose writes are
    counted: the fast backend computes the text keys/values once per generation, not at every step."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    base, _ = _models()
    pipe = Pipeline(base, encoder, backend="fast", progress=False)
    calls = []
    layers = [m.register_forward_hook(lambda *_: calls.append(1))
              for name, m in pipe.base_stage.backend.model.named_modules() if name.endswith("cross_kv")]
    kw = dict(num_frames=8, height=8, width=8, num_inference_steps=3, seed=0)
    want = pipe("a teddy bear surfing", **kw).frames
    assert len(calls) == len(layers)
    with torch.inference_mode():
        assert np.array_equal(pipe("a teddy bear surfing", **kw).frames, want)
    assert len(calls) == 2 * len(layers)
