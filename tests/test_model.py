"""The reference STUNet: temporal identities at initialisation, presets, determinism, dtypes, broadcasting."""
from __future__ import annotations

import pytest
import torch
from utils import assert_close, make_inputs, randomize_temporal

import stunet
from stunet.model import (Cond, ConvInflationBlock, ResBlock, SpatialAttention, TemporalAttentionBlock,
                          TemporalDown, TemporalUp)
from stunet.model import PER_FRAME, REFERENCE, from_clips, to_clips

FRAME_COUNTS = [1, 2, 7, 8, 17]  # T = 1, odd, even, and a prime past a power of two


def _folded(batch: int, frames: int, ch: int = 8, size: int = 4, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch * frames, ch, size, size, generator=g)


def _cond(batch: int) -> Cond:
    return Cond(batch=batch, emb=torch.zeros(batch, 4), text=torch.zeros(batch, 1, 4), text_mask=None,
                policy=REFERENCE)


# -- temporal modules at initialisation ---------------------------------------------------------------------------
@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_temporal_down_at_init_picks_even_frames(frames):
    x = _folded(2, frames)
    y = TemporalDown(8)(x, _cond(2))
    expected = from_clips(to_clips(x, 2)[:, :, ::2])
    assert torch.equal(y, expected)


@pytest.mark.parametrize("frames", FRAME_COUNTS)
def test_temporal_up_at_init_duplicates_frames(frames):
    x = _folded(2, frames)
    y = TemporalUp(8)(x, _cond(2))
    expected = from_clips(to_clips(x, 2).repeat_interleave(2, dim=2))
    assert torch.equal(y, expected)


@pytest.mark.parametrize("frames", FRAME_COUNTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("make", [
    lambda: ConvInflationBlock(8, 4, "frame"),
    lambda: ConvInflationBlock(8, 4, "clip"),
    lambda: TemporalAttentionBlock(8, 2, "sinusoidal"),
    lambda: TemporalAttentionBlock(8, 2, "none"),
], ids=["conv-inflation", "conv-inflation-clipnorm", "temporal-attn", "temporal-attn-nopos"])
def test_fresh_temporal_block_is_exactly_identity(make, frames, dtype):
    x = _folded(3, frames).to(dtype)
    with torch.no_grad():
        y = make().to(dtype)(x, _cond(3))
    assert torch.equal(y, x)


def test_temporal_modules_mix_frames_once_trained():
    """Sanity check that the identity tests are not vacuous: non-zero weights do mix frames."""
    x = _folded(1, 4)
    for block in (ConvInflationBlock(8, 4, "frame"), TemporalAttentionBlock(8, 2)):
        with torch.no_grad():
            for p in block.parameters():
                p.add_(0.1)
            y = block(x, _cond(1))
            x2 = x.clone()
            x2[1] += 1.0  # perturb frame 1 only; frame 0 must see it
            y2 = block(x2, _cond(1))
        assert not torch.equal(y[0], y2[0]), f"{type(block).__name__} did not propagate across frames"


# -- the whole network -------------------------------------------------------------------------------------------
# FP64 and FP16, where PyTorch's CPU convolutions compute each image of a batch on its own. In FP32 a 1x1
# convolution on one thread takes a oneDNN path whose last bits depend on how many images share the batch
# (4.8e-7 apart for 16 images against 2), and the video's batch (B*T, halved at each temporal downsampling) is
# not the per-frame U-Net's (B): there the two agree to rounding, not bit for bit.
STATIC_DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["fp64", "fp16"])


@STATIC_DTYPES
@pytest.mark.parametrize("overrides", [{}, {"temporal_pos_embed": "none"}, {"in_channels": 7}],
                         ids=["default", "no-pos-embed", "7-channel"])
def test_static_video_gives_the_per_frame_unet_output_exactly(overrides, dtype):
    cfg = stunet.STUNetConfig.from_preset("tiny", **overrides)
    torch.manual_seed(0)
    model = stunet.STUNet(cfg).eval().to(dtype)
    x, t, text = make_inputs(cfg, batch=2, frames=8, dtype=dtype)
    frame = x[:, :, :1]
    video = frame.expand_as(x).contiguous()
    with torch.no_grad():
        out = model(video, t, text)
        per_frame = model(frame, t, text, policy=PER_FRAME)  # the text-to-image U-Net on a single frame
    assert torch.equal(out, per_frame.expand_as(out))


@STATIC_DTYPES
def test_ssr_static_video_gives_the_per_frame_unet_output_exactly(dtype):
    cfg = stunet.STUNetConfig.from_preset("tiny", in_channels=6, noise_aug=True, low_res_size=8,
                                          temporal_downsample=(False, False), temporal_attn_depth=0)
    torch.manual_seed(0)
    model = stunet.STUNet(cfg).eval().to(dtype)
    x, t, text = make_inputs(cfg, batch=2, frames=3, dtype=dtype)
    frame = x[:, :, :1]
    with torch.no_grad():
        out = model(frame.expand_as(x).contiguous(), t, text, noise_level=250)
        per_frame = model(frame, t, text, noise_level=250, policy=PER_FRAME)
    assert torch.equal(out, per_frame.expand_as(out))


def test_per_frame_policy_is_the_per_frame_unet(tiny_model, tiny_config):
    """Removing the temporal modules leaves frames independent: the folded batch is just more images."""
    randomize_temporal(tiny_model)
    x, t, text = make_inputs(tiny_config, batch=1, frames=3)
    with torch.no_grad():
        whole = tiny_model(x, t, text, policy=PER_FRAME)
        for f in range(3):
            single = tiny_model(x[:, :, f:f + 1], t, text, policy=PER_FRAME)
            assert_close(whole[:, :, f:f + 1], single, atol=1e-5, rtol=1e-5, what=f"frame {f}")


def test_trained_temporal_modules_change_the_output(tiny_model, tiny_config):
    x, t, text = make_inputs(tiny_config, batch=1)
    with torch.no_grad():
        before = tiny_model(x, t, text)
        after = randomize_temporal(tiny_model)(x, t, text)
    assert not torch.allclose(before, after)


PRESET_INPUTS = {  # reduced sizes: the smallest input each preset accepts, so a forward is cheap on a CPU
    "tiny": (8, 16), "tiny-cond": (8, 16), "small": (4, 16), "lumiere-base": (16, 16), "lumiere-ssr": (2, 16),
    "edge": (8, 8),
}


@pytest.mark.parametrize("preset", list(stunet.PRESETS))
def test_every_preset_builds_and_runs_a_forward(preset):
    cfg = stunet.STUNetConfig.from_preset(preset)
    frames, size = PRESET_INPUTS[preset]
    torch.manual_seed(0)
    model = stunet.STUNet(cfg).eval()
    x, t, text = make_inputs(cfg, batch=1, frames=frames, size=size, text_len=3)
    kwargs = {"noise_level": 100} if cfg.noise_aug else {}
    with torch.no_grad():
        out = model(x, t, text, **kwargs)
    assert out.shape == (1, cfg.out_channels, frames, size, size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_same_seed_same_weights_and_bit_identical_outputs(tiny_config):
    models = []
    for _ in range(2):
        torch.manual_seed(123)
        models.append(randomize_temporal(stunet.STUNet(tiny_config).eval()))
    a, b = (m.state_dict() for m in models)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, text = make_inputs(tiny_config)
    with torch.no_grad():
        assert torch.equal(models[0](x, t, text), models[1](x, t, text))
        assert torch.equal(models[0](x, t, text), models[0](x, t, text))
    torch.manual_seed(124)
    other = stunet.STUNet(tiny_config)
    assert not torch.equal(other.state_dict()["out.conv.weight"], a["out.conv.weight"])


# fp16 against fp32 on the same weights and inputs: the fp16 output stays within 2% of the output's RMS
# everywhere (|err| <= 0.02 * rms(out_fp32) + 1e-2 * |out|); measured: worst |err| 0.95% of the RMS,
# relative L2 error 0.17%.
@pytest.mark.parametrize("norm_scope", ["frame", "clip"])
def test_fp16_agrees_with_fp32(norm_scope):
    cfg = stunet.STUNetConfig.from_preset("tiny", norm_scope=norm_scope)
    torch.manual_seed(0)
    model = randomize_temporal(stunet.STUNet(cfg).eval())
    x, t, text = make_inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, text)
        half = model.half()(x.half(), t, text.half())
    assert half.dtype == torch.float16
    rms = ref.pow(2).mean().sqrt().item()
    assert_close(half.float(), ref, atol=0.02 * rms, rtol=1e-2, what="fp16 vs fp32")


def test_batch_items_are_independent(tiny_model, tiny_config):
    randomize_temporal(tiny_model)
    x, t, text = make_inputs(tiny_config, batch=3)
    with torch.no_grad():
        whole = tiny_model(x, t, text)
        for b in range(3):
            one = tiny_model(x[b:b + 1], t[b:b + 1], text[b:b + 1])
            assert_close(whole[b:b + 1], one, atol=1e-5, rtol=1e-5, what=f"clip {b}")


def test_scalar_timestep_equals_broadcast_vector(tiny_model, tiny_config):
    x, _, text = make_inputs(tiny_config)
    with torch.no_grad():
        assert torch.equal(tiny_model(x, 321, text), tiny_model(x, torch.tensor([321, 321]), text))


def test_masked_text_tokens_are_ignored(tiny_model, tiny_config):
    x, t, text = make_inputs(tiny_config, text_len=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    changed = text.clone()
    changed[0, 3:] = torch.randn(3, tiny_config.text_dim)
    changed[1, 5:] = 100.0
    with torch.no_grad():
        a = tiny_model(x, t, text, mask)
        b = tiny_model(x, t, changed, mask)
        unmasked = tiny_model(x, t, changed)
    assert_close(a, b, atol=1e-6, rtol=1e-5, what="masked tokens")
    assert not torch.allclose(a, unmasked)


def test_timestep_and_text_are_broadcast_not_copied_per_frame(tiny_model, tiny_config):
    """The embedding projection and the text key/value projection see B rows, never B*T."""
    seen: dict[str, list] = {"emb": [], "text": []}
    hooks = []
    for module in tiny_model.modules():
        if isinstance(module, ResBlock):
            hooks.append(module.emb_proj.register_forward_hook(lambda m, i, o: seen["emb"].append(i[0].shape)))
        if isinstance(module, SpatialAttention):
            hooks.append(module.cross_kv.register_forward_hook(lambda m, i, o: seen["text"].append(i[0].shape)))
    x, t, text = make_inputs(tiny_config, batch=2, frames=8, text_len=5)
    with torch.no_grad():
        tiny_model(x, t, text)
    for h in hooks:
        h.remove()
    assert seen["emb"] and all(s == (2, tiny_config.time_embed_dim) for s in seen["emb"])
    assert seen["text"] and all(s == (2, 5, tiny_config.text_dim) for s in seen["text"])


def test_conditional_and_ssr_models_run(tiny_config):
    for overrides in ({"in_channels": 7},
                      {"in_channels": 6, "noise_aug": True, "low_res_size": 8}):
        cfg = tiny_config.replace(**overrides)
        model = stunet.STUNet(cfg).eval()
        x, t, text = make_inputs(cfg)
        with torch.no_grad():
            out = model(x, t, text)
        assert out.shape == (2, 3, 8, 16, 16)
        if cfg.noise_aug:
            with torch.no_grad():
                assert not torch.allclose(out, model(x, t, text, noise_level=torch.tensor([900, 900])))


# -- GPU: the same properties in fp16 on CUDA --------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_fp16_static_video_identity():
    cfg = stunet.STUNetConfig.from_preset("tiny")
    torch.manual_seed(0)
    model = stunet.STUNet(cfg).eval().cuda().half()
    x, t, text = make_inputs(cfg, dtype=torch.float16, device="cuda")
    frame = x[:, :, :1]
    with torch.no_grad():
        out = model(frame.expand_as(x).contiguous(), t, text)
        per_frame = model(frame, t, text, policy=PER_FRAME)
    assert_close(out, per_frame.expand_as(out), atol=1e-3, rtol=1e-3, what="cuda fp16 identity")


@pytest.mark.gpu
@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_gpu_fp16_matches_cpu_fp32_and_is_deterministic(preset):
    cfg = stunet.STUNetConfig.from_preset(preset)
    torch.manual_seed(0)
    model = randomize_temporal(stunet.STUNet(cfg).eval())
    x, t, text = make_inputs(cfg, batch=2)
    with torch.no_grad():
        ref = model(x, t, text)
        gpu = model.cuda().half()
        args = (x.cuda().half(), t.cuda(), text.cuda().half())
        a, b = gpu(*args), gpu(*args)
    assert torch.equal(a, b)
    rms = ref.pow(2).mean().sqrt().item()
    assert_close(a.float().cpu(), ref, atol=0.02 * rms, rtol=1e-2, what=f"{preset} cuda fp16 vs cpu fp32")


@pytest.mark.parametrize("scope", ["frame", "clip"])
def test_the_reference_model_trains_with_the_inference_values(scope):
    """Backward runs through the reference model (tools/train_demo.py trains with it), and the forward with
    autograd on (out-of-place norm arithmetic) equals the inference forward (in place) bit for bit."""
    cfg = stunet.STUNetConfig.from_preset("tiny", norm_scope=scope)
    model = randomize_temporal(stunet.STUNet(cfg))
    x, t, text = make_inputs(cfg, batch=2)
    with torch.no_grad():
        expected = model(x, t, text)
    out = model(x, t, text)
    out.square().mean().backward()
    assert torch.equal(out.detach(), expected)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.encoder[0].parameters())


def test_pooled_text_conditioning_reads_only_the_unmasked_tokens():
    cfg = stunet.STUNetConfig.from_preset("tiny", text_pool=True)
    assert "text_pool.weight" in stunet.STUNet(cfg).state_dict()
    assert "text_pool.weight" not in stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).state_dict()
    torch.manual_seed(0)
    model = stunet.STUNet(cfg).eval()
    x, t, text = make_inputs(cfg, batch=2)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    padded = text.clone()
    padded[1, 2:] = 100.0  # what the mask hides must not matter
    with torch.no_grad():
        assert torch.equal(model(x, t, text, mask), model(x, t, padded, mask))
        assert not torch.equal(model(x, t, text, mask), model(x, t, text))
    pooled = stunet.model.unet.pooled_text(text, mask)
    assert torch.allclose(pooled[1], text[1, :2].mean(0)) and torch.allclose(pooled[0], text[0].mean(0))
    assert torch.equal(stunet.model.unet.pooled_text(text, torch.zeros(2, 5, dtype=torch.bool)),
                       torch.zeros(2, cfg.text_dim))
