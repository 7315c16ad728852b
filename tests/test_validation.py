"""Bad inputs to STUNet.forward raise before any computation, naming the argument and the fix."""
from __future__ import annotations

import pytest
import torch
from utils import make_inputs

import stunet
from stunet.model import PER_FRAME


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def ssr_model():
    cfg = stunet.STUNetConfig.from_preset("tiny", in_channels=6, noise_aug=True, low_res_size=8)
    return stunet.STUNet(cfg).eval()


@pytest.fixture
def inputs(model):
    return make_inputs(model.config, batch=2, frames=8, size=16, text_len=5)


def call(model, x, t, text, *args, **kwargs):
    with torch.no_grad():
        return model(x, t, text, *args, **kwargs)


CASES = {
    # name: (how to break the inputs, exception, message)
    "x-not-a-tensor": (lambda x, t, s: (x.numpy(), t, s), TypeError, "x must be a torch.Tensor"),
    "x-4d": (lambda x, t, s: (x[:, :, 0], t, s), ValueError, r"x must be 5-D.*x\[:, :, None\]"),
    "x-integer": (lambda x, t, s: (x.long(), t, s), TypeError, "x must be a floating-point tensor"),
    "x-empty": (lambda x, t, s: (x[:, :, :0], t, s), ValueError, "must not have an empty dimension"),
    "x-channels": (lambda x, t, s: (x[:, :2], t, s), ValueError, r"x has 2 channels but the model takes "
                                                                   r"in_channels=3"),
    "T-not-divisible": (lambda x, t, s: (x[:, :, :7], t, s), ValueError,
                        "T=7 frames.*multiple of 2; use e.g. T=6 or 8"),
    "H-not-divisible": (lambda x, t, s: (x[:, :, :, :14], t, s), ValueError, "H=14.*multiple of 4"),
    "W-not-divisible": (lambda x, t, s: (x[..., :15], t, s), ValueError, "W=15.*multiple of 4"),
    "x-dtype": (lambda x, t, s: (x.double(), t, s), TypeError,
                r"x has dtype torch.float64 but the model's weights are torch.float32"),
    "text-not-a-tensor": (lambda x, t, s: (x, t, s.tolist()), TypeError, "text_embeds must be a torch.Tensor"),
    "text-2d": (lambda x, t, s: (x, t, s[0]), ValueError, r"text_embeds must be 3-D \(B, L, text_dim\)"),
    "text-dim": (lambda x, t, s: (x, t, s[..., :20]), ValueError, "text_embeds has width 20 but.*text_dim=24"),
    "text-batch": (lambda x, t, s: (x, t, s[:1]), ValueError, "text_embeds has batch 1 but x has batch 2"),
    "text-empty": (lambda x, t, s: (x, t, s[:, :0]), ValueError, r"no tokens \(L=0\)"),
    "text-dtype": (lambda x, t, s: (x, t, s.half()), TypeError, "text_embeds has dtype torch.float16"),
    "t-shape": (lambda x, t, s: (x, t[:1], s), ValueError, r"timesteps must be a scalar or have shape \(2,\)"),
    "t-range": (lambda x, t, s: (x, t + 5000, s), ValueError, r"timesteps must lie in \[0, 1000\]"),
    "t-negative": (lambda x, t, s: (x, -1, s), ValueError, r"timesteps must lie in \[0, 1000\]"),
    "t-nan": (lambda x, t, s: (x, float("nan"), s), ValueError, "timesteps contains NaN"),
    "t-string": (lambda x, t, s: (x, "10", s), TypeError, "timesteps must be a number or a tensor"),
    "t-bool": (lambda x, t, s: (x, torch.tensor([True, False]), s), TypeError, "timesteps must be real-valued"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_named(model, inputs, case):
    breaker, exc, message = CASES[case]
    with pytest.raises(exc, match=message):
        call(model, *breaker(*inputs))


def test_device_mismatch_is_named(model, inputs):
    x, t, text = inputs
    meta_x = torch.empty(x.shape, device="meta")
    with pytest.raises(ValueError, match=r"x is on meta but the model's weights are on cpu.*\.to\('cpu'\)"):
        call(model, meta_x, t, text)
    with pytest.raises(ValueError, match="text_embeds is on meta"):
        call(model, x, t, torch.empty(text.shape, device="meta"))


@pytest.mark.parametrize("mask,exc,message", [
    (torch.ones(2, 4, dtype=torch.bool), ValueError, r"text_mask must have shape \(2, 5\)"),
    (torch.ones(2, 5), TypeError, "text_mask must be bool"),
    ([[1] * 5] * 2, TypeError, "text_mask must be a tensor"),
    (torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool), ValueError,
     r"masks every token of clip\(s\) \[1\]"),
], ids=["shape", "float", "list", "all-masked"])
def test_bad_text_mask_is_named(model, inputs, mask, exc, message):
    with pytest.raises(exc, match=message):
        call(model, *inputs, mask)


def test_integer_text_mask_is_accepted(model, inputs):
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert torch.equal(call(model, *inputs, mask), call(model, *inputs, mask.bool()))


def test_nan_check_is_opt_in(model, inputs, monkeypatch):
    x, t, text = inputs
    x = x.clone()
    x[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"x contains 1 NaN/inf value\(s\)"):
        call(model, x, t, text, check_finite=True)
    text = text.clone()
    text[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match="text_embeds contains 1 NaN/inf"):
        call(model, x.nan_to_num(), t, text, check_finite=True)
    assert torch.isnan(call(model, x, t, text.nan_to_num())).any()  # unchecked by default
    monkeypatch.setenv("STUNET_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="x contains"):
        call(model, x, t, text)


def test_noise_level_only_for_ssr(model, inputs, ssr_model):
    with pytest.raises(ValueError, match="noise_level is only taken by SSR models"):
        call(model, *inputs, noise_level=100)
    x, t, text = make_inputs(ssr_model.config, batch=2, frames=4, size=8)
    with pytest.raises(ValueError, match=r"noise_level must lie in \[0, 1000\]"):
        call(ssr_model, x, t, text, noise_level=2000)
    with pytest.raises(ValueError, match=r"x has 3 channels but the model takes in_channels=6 \(SSR"):
        call(ssr_model, x[:, :3], t, text)


def test_model_needs_a_config():
    with pytest.raises(TypeError, match="config must be a STUNetConfig"):
        stunet.STUNet({"model_channels": 8})


def test_per_frame_policy_accepts_any_frame_count(model, inputs):
    x, t, text = inputs
    assert call(model, x[:, :, :7], t, text, policy=PER_FRAME).shape[2] == 7
