"""stunet.convert.from_diffusers against diffusers itself: tiny random U-Nets built offline, fp32, several
configurations of each class; the fast backend on the converted configs; strict refusal of what does not map."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers_models import randomized
from utils import assert_close

import stunet
from stunet.backends import FastBackend
from stunet.convert import ConversionError, from_diffusers
from stunet.kernels import _triton

diffusers = pytest.importorskip("diffusers")

TEXT_DIMS = (24, 40)


def _blocks(kind: str, cross: tuple[bool, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    names = {"3d": ("CrossAttnDownBlock3D", "DownBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"),
             "2d": ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")}[kind]
    down = tuple(names[0] if c else names[1] for c in cross)
    up = tuple(names[2] if c else names[3] for c in reversed(cross))
    return down, up


# (block_out_channels, cross-attention per level, layers_per_block, heads/head width, groups, text width)
VIDEO_CONFIGS = [
    ((32, 64), (True, False), 1, 8, 8, 24),
    ((16, 32, 32), (True, True, False), 2, 8, 4, 40),
    ((24, 48), (False, True), 1, 12, 8, 24),
]


def _unet3d(widths, cross, layers, head_dim, groups, text_dim, seed=0):
    down, up = _blocks("3d", cross)
    model = diffusers.UNet3DConditionModel(
        block_out_channels=widths, down_block_types=down, up_block_types=up, layers_per_block=layers,
        cross_attention_dim=text_dim, attention_head_dim=head_dim, norm_num_groups=groups, sample_size=16)
    return randomized(model, seed)


def _unet2d(widths, cross, layers, heads, groups, text_dim, seed=0, **options):
    down, up = _blocks("2d", cross)
    model = diffusers.UNet2DConditionModel(
        block_out_channels=widths, down_block_types=down, up_block_types=up, layers_per_block=layers,
        cross_attention_dim=text_dim, attention_head_dim=heads, norm_num_groups=groups, sample_size=16,
        **options)
    return randomized(model, seed)


def _motion(widths, cross, layers, heads, groups, text_dim, seed=0, motion_heads=2, mid=True, max_len=24):
    unet = _unet2d(widths, cross, layers, heads, groups, text_dim, seed)
    adapter = diffusers.MotionAdapter(
        block_out_channels=widths, motion_layers_per_block=layers, motion_num_attention_heads=motion_heads,
        motion_norm_num_groups=groups, motion_max_seq_length=max_len, use_motion_mid_block=mid)
    return randomized(diffusers.UNetMotionModel.from_unet2d(unet, adapter), seed + 1)


def _inputs(model: stunet.STUNet, frames: int, batch: int = 2, text_len: int = 7, seed: int = 0, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    x = torch.randn(batch, cfg.in_channels, frames, size, size, generator=g)
    t = torch.tensor([17.0, 803.0][:batch])
    text = torch.randn(batch, text_len, cfg.text_dim, generator=g)
    return x, t, text


def _assert_relative(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """max |got - want| <= tol * max |want|: the contract's "to 1e-5 relative"."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= tol * scale, f"{what}: max |err| {err:.3g} > {tol:g} x max |ref| {scale:.3g}"


@pytest.mark.parametrize("spec", VIDEO_CONFIGS, ids=["2lv", "3lv-2layers", "attn-at-1"])
def test_unet3d_condition_model_converts_exactly(spec):
    theirs = _unet3d(*spec)
    ours = from_diffusers(theirs)
    cfg = ours.config
    assert cfg.in_channels == 4 and cfg.temporal_conv == "stack" and cfg.temporal_in_heads == 8
    x, t, text = _inputs(ours, frames=5)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=text).sample
        got = ours(x, t, text)
    _assert_relative(got, want, 1e-5, "UNet3DConditionModel")


@pytest.mark.parametrize("spec,motion_heads,mid", [
    (VIDEO_CONFIGS[0], 2, True), (VIDEO_CONFIGS[1], 4, False), (VIDEO_CONFIGS[2], (2, 4), True)],
    ids=["2lv", "3lv-no-mid", "head-width-fixed"])
def test_unet_motion_model_converts_exactly(spec, motion_heads, mid):
    widths, cross, layers, head_dim, groups, text_dim = spec
    heads = tuple(w // head_dim for w in widths)  # per level: the same head width everywhere
    theirs = _motion(widths, cross, layers, heads, groups, text_dim, motion_heads=motion_heads, mid=mid)
    ours = from_diffusers(theirs)
    cfg = ours.config
    assert cfg.temporal_attn == "transformer" and cfg.temporal_pos_embed == "sinusoidal"
    assert cfg.temporal_max_frames == 24 and ("temporal_attn" in cfg.mid_modules) == mid
    frames = 6
    x, t, text = _inputs(ours, frames=frames)
    with torch.no_grad():
        want = theirs(x, t, encoder_hidden_states=text.repeat_interleave(frames, 0)).sample
        got = ours(x, t, text)
    _assert_relative(got, want, 1e-5, "UNetMotionModel")
    with pytest.raises(ValueError, match="temporal_max_frames=24"):
        ours(*_inputs(ours, frames=32))


@pytest.mark.parametrize("heads,options", [(8, {}), ((2, 4), {"use_linear_projection": True}),
                                           (4, {"flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6})],
                         ids=["sd1-heads", "sd2-head-width-linear-proj", "sin-first-shifted"])
def test_unet2d_condition_model_inflates_to_a_per_frame_equal_video_model(heads, options):
    theirs = _unet2d((32, 64), (True, True), 1, heads, 8, 24, **options)
    ours = from_diffusers(theirs)
    cfg = ours.config
    assert cfg.temporal_downsample == (True,) and cfg.temporal_attn_depth == 1
    assert ours.temporal_keys(), "the inflated model has temporal modules"
    g = torch.Generator().manual_seed(3)
    frame = torch.randn(2, 4, 16, 16, generator=g)
    video = frame[:, :, None].expand(-1, -1, 8, -1, -1).contiguous()
    t, text = torch.tensor([5.0, 640.0]), torch.randn(2, 7, 24, generator=g)
    with torch.no_grad():
        want = theirs(frame, t, encoder_hidden_states=text).sample
        got = ours(video, t, text)
    for f in range(8):
        _assert_relative(got[:, :, f], want, 1e-5, f"inflated frame {f}")


def test_inflation_options_and_overrides_apply():
    theirs = _unet2d((16, 32, 32), (True, True, False), 1, 8, 4, 24)
    ours = from_diffusers(theirs, temporal_downsample=(True, False), temporal_attn_depth=2, prediction="v")
    cfg = ours.config
    assert cfg.temporal_downsample == (True, False) and cfg.mid_modules.count("temporal_attn") == 2
    assert cfg.prediction == "v" and cfg.frame_divisor == 2


def test_a_conversion_is_reproducible_leaves_the_callers_random_state_and_rounds_as_to_dtype():
    """An inflation keeps some of the STUNet's own initialisation (the temporal modules it adds): drawn from a
    fixed seed, it is the same in every conversion, and the caller's random stream goes on as if no conversion
    had run. A video model's conversion into fp16 or bf16 holds exactly the fp32 conversion's weights, rounded
    by .to(dtype)."""
    theirs = _unet2d((32, 64), (True, False), 1, 8, 8, 24)
    torch.manual_seed(123)
    first = from_diffusers(theirs).state_dict()
    drawn_after = torch.rand(4)
    torch.manual_seed(123)
    second = from_diffusers(theirs).state_dict()
    assert torch.equal(torch.rand(4), drawn_after) and torch.get_default_dtype() == torch.float32
    assert [k for k in first if not torch.equal(first[k], second[k])] == []
    video = _unet3d(*VIDEO_CONFIGS[0])
    full = from_diffusers(video).state_dict()
    for dtype in (torch.float16, torch.bfloat16):
        rounded = from_diffusers(video, dtype=dtype)
        assert rounded.dtype == dtype and torch.get_default_dtype() == torch.float32
        assert [k for k, v in rounded.state_dict().items() if not torch.equal(v, full[k].to(dtype))] == []
    with pytest.raises(ValueError, match=r"dtype must be one of torch.float32, torch.float16, torch.bfloat16, got "
                                         r"'fp16'"):
        from_diffusers(theirs, dtype="fp16")


def test_converted_model_saves_and_loads_with_the_same_outputs(tmp_path):
    ours = from_diffusers(_motion(*VIDEO_CONFIGS[0]))
    ours.save_pretrained(tmp_path)
    loaded = stunet.STUNet.from_pretrained(tmp_path)
    assert loaded.config == ours.config
    x, t, text = _inputs(ours, frames=4)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, text), ours(x, t, text))


@pytest.mark.skipif(_triton.triton is None, reason="Triton is not installed")
@pytest.mark.parametrize("build", [lambda: _unet3d(*VIDEO_CONFIGS[0]), lambda: _motion(*VIDEO_CONFIGS[0])],
                         ids=["modelscope", "animatediff"])
def test_fast_backend_runs_converted_models_like_the_reference(build):
    """The kernels (the temporal-attention kernel at every level it sits, clip-scope GroupNorm) in Triton's
    interpreter and the channels-last trunk: fp32 rounding only."""
    ours = from_diffusers(build())
    reference = copy.deepcopy(ours)
    x, t, text = _inputs(ours, frames=3, batch=1, size=8)
    with torch.no_grad():
        got = FastBackend(ours)(x, t, text)
        want = reference(x, t, text)
    assert_close(got, want, atol=2e-5, rtol=2e-5, what="fast vs reference on a converted model")


def test_unsupported_options_block_types_and_models_are_named():
    with pytest.raises(ConversionError, match="class_embed_type='timestep'"):
        from_diffusers(_unet2d((32, 64), (True, False), 1, 8, 8, 24, class_embed_type="timestep"))
    with pytest.raises(ConversionError, match="transformer_layers_per_block=2"):
        from_diffusers(_unet2d((32, 64), (True, False), 1, 8, 8, 24, transformer_layers_per_block=2))
    with pytest.raises(ConversionError, match="resnet_time_scale_shift='scale_shift'"):
        from_diffusers(_unet2d((32, 64), (True, False), 1, 8, 8, 24, resnet_time_scale_shift="scale_shift"))
    plain = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64), down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"), layers_per_block=1, cross_attention_dim=24,
        attention_head_dim=8, norm_num_groups=8)
    with pytest.raises(ConversionError, match="down block type 'AttnDownBlock2D'"):
        from_diffusers(plain)
    with pytest.raises(ConversionError, match="model type Linear"):
        from_diffusers(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="must be a diffusers U-Net module"):
        from_diffusers("models/zeroscope")


def test_sd_family_heads_are_mapped_per_level():
    """SD 1.x: 8 heads at every level (their width varies); SD 2.x: a fixed head width (their count varies)."""
    fixed_heads = from_diffusers(_unet2d((32, 64), (True, True), 1, 8, 8, 24)).config
    assert fixed_heads.attention_heads == 8 and fixed_heads.spatial_heads(64) == 8
    fixed_width = from_diffusers(_unet2d((32, 64), (True, True), 1, (2, 4), 8, 24)).config
    assert fixed_width.attention_heads == 0 and fixed_width.attention_head_dim == 16
    with pytest.raises(ConversionError, match="num_attention_heads=\\(2, 2\\)|neither the head count"):
        from_diffusers(_unet2d((32, 64), (True, True), 1, (2, 8), 8, 24))


def test_a_converted_model_exports_to_onnx_that_matches_the_reference(tmp_path):
    """The export route takes the new temporal forms too: a converted ModelScope U-Net (temporal conv stacks,
    temporal transformers, the one after conv_in), checked by onnxruntime against the reference."""
    pytest.importorskip("onnxruntime")
    from stunet.export import export_onnx

    model = from_diffusers(_unet3d(*VIDEO_CONFIGS[0]))
    result = export_onnx(model, tmp_path / "modelscope.onnx", batch=1, frames=3, height=16, width=16, text_len=7,
                         dynamic=False, check=True)
    assert result.max_abs_error is not None and result.max_abs_error <= 1e-4, result.max_abs_error
