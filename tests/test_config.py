"""STUNetConfig: presets, JSON round trip, derived geometry and validation messages."""
from __future__ import annotations

import json

import pytest

import stunet
from stunet import STUNetConfig


@pytest.mark.parametrize("preset", list(stunet.PRESETS))
def test_preset_json_round_trip(preset, tmp_path):
    cfg = STUNetConfig.from_preset(preset)
    assert STUNetConfig.from_json(cfg.to_json()) == cfg
    cfg.save(tmp_path)
    assert STUNetConfig.load(tmp_path) == cfg
    assert json.loads((tmp_path / "config.json").read_text())["channel_mult"] == list(cfg.channel_mult)


def test_lumiere_base_is_the_documented_architecture():
    cfg = STUNetConfig.from_preset("lumiere-base")
    assert cfg.level_channels == (256, 512, 768, 1024, 1024)
    assert cfg.num_res_blocks == 3 and cfg.text_dim == 4096 and cfg.temporal_attn_depth == 4
    assert cfg.level_shapes(80, 128, 128) == [(80, 128, 128, 256), (40, 64, 64, 512), (20, 32, 32, 768),
                                              (10, 16, 16, 1024), (5, 8, 8, 1024)]
    assert [cfg.level_shapes(80, 128, 128)[i][1] for i in cfg.attention_levels] == [32, 16, 8]
    assert cfg.frame_divisor == 16 and cfg.spatial_divisor == 16


def test_lumiere_ssr_has_no_temporal_resampling():
    cfg = STUNetConfig.from_preset("lumiere-ssr")
    assert cfg.in_channels == 6 and cfg.noise_aug and cfg.frame_divisor == 1 and cfg.temporal_attn_depth == 0
    assert (cfg.low_res_size, cfg.sample_size, cfg.window_frames, cfg.window_overlap) == (128, 1024, 16, 2)


def test_preset_overrides_and_replace_validate():
    cfg = STUNetConfig.from_preset("tiny", prediction="eps")
    assert cfg.prediction == "eps"
    assert cfg.replace(schedule="linear").schedule == "linear"
    with pytest.raises(ValueError, match="prediction"):
        cfg.replace(prediction="x0")
    with pytest.raises(ValueError, match="unknown field"):
        cfg.replace(widths=3)


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*lumiere-base"):
        STUNetConfig.from_preset("huge")


def test_config_is_frozen_and_hashable():
    cfg = STUNetConfig.from_preset("tiny")
    with pytest.raises(AttributeError):
        cfg.model_channels = 3  # type: ignore[misc]
    assert hash(cfg) == hash(STUNetConfig.from_json(cfg.to_json()))


BAD_FIELDS = [
    ({"in_channels": 5}, "in_channels must be 3"),
    ({"model_channels": 0}, "model_channels must be a positive integer"),
    ({"model_channels": 10}, "num_groups must divide every level's width"),
    ({"channel_mult": ()}, "channel_mult must be a non-empty"),
    ({"channel_mult": (1, 2)}, "temporal_downsample must hold one bool per downsample step"),
    ({"temporal_downsample": (1, 0)}, "temporal_downsample must hold one bool"),
    ({"attention_levels": (5,)}, r"attention_levels must hold level indices in \[0, 2\]"),
    ({"attention_levels": (1, 1)}, "must not repeat"),
    ({"attention_head_dim": 7}, "attention_head_dim must divide"),
    ({"temporal_attn_heads": 3}, "temporal_attn_heads must divide the width 32 of level 2"),
    ({"attention_heads": 3}, "attention_heads must divide the width of every attention level"),
    ({"feed_forward": "swiglu"}, "feed_forward must be one of"),
    ({"temporal_conv": "3d"}, "temporal_conv must be one of"),
    ({"temporal_attn": "full"}, "temporal_attn must be one of"),
    ({"temporal_after_res": ("conv",)}, "temporal_after_res must be empty or hold one of"),
    ({"temporal_after_attn": ("conv", "conv", "lstm")}, "temporal_after_attn must be empty or hold one of"),
    ({"mid_block": ("attn", "res")}, "mid_block must be empty or start with 'res'"),
    ({"mid_block": ("res", "attn", "res")}, "temporal_attn_depth must equal the number of 'temporal_attn'"),
    ({"temporal_in_heads": 2}, "temporal_in_heads needs temporal_attn='transformer'"),
    ({"temporal_attn": "transformer", "temporal_attn_head_dim": 12}, "temporal_attn_head_dim must divide"),
    ({"norm_eps": 0.0}, r"norm_eps must be a number in \(0, 1\)"),
    ({"attention_norm_eps": "1e-6"}, r"attention_norm_eps must be a number in \(0, 1\)"),
    ({"flip_sin_to_cos": 1}, "flip_sin_to_cos must be a bool"),
    ({"freq_shift": 8}, "freq_shift must be smaller than model_channels // 2"),
    ({"temporal_max_frames": -1}, "temporal_max_frames must be a non-negative integer"),
    ({"norm_scope": "batch"}, "norm_scope must be one of"),
    ({"temporal_pos_embed": "rope"}, "temporal_pos_embed must be one of"),
    ({"prediction": "x0"}, "prediction must be one of"),
    ({"schedule": "sigmoid"}, "schedule must be one of"),
    ({"noise_aug": True}, "noise_aug needs in_channels=6"),
    ({"in_channels": 6}, "low_res_size must be set"),
    ({"low_res_size": 32}, "low_res_size is only meaningful for an SSR model"),
    ({"sample_frames": 7}, r"sample_frames must be divisible by 2\*\*\(temporal downsamples\) = 2"),
    ({"sample_size": 10}, r"sample_size must be divisible by 2\*\*\(num_levels - 1\) = 4"),
    ({"window_frames": 8, "window_overlap": 8}, "window_overlap must be smaller than window_frames"),
    ({"window_overlap": 2}, "window_overlap needs window_frames > 0"),
    ({"num_res_blocks": True}, "num_res_blocks must be a positive integer"),
    ({"channel_mult": "12"}, "channel_mult must be a sequence"),
]


@pytest.mark.parametrize("overrides,message", BAD_FIELDS, ids=[next(iter(o)) for o, _ in BAD_FIELDS])
def test_invalid_field_is_named_with_the_rule(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        STUNetConfig.from_preset("tiny", **overrides)
    assert "STUNetConfig." in str(info.value) and "got" in str(info.value)


def test_from_dict_rejects_unknown_fields_and_bad_json(tmp_path):
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['widths'\]"):
        STUNetConfig.from_dict({"widths": 3})
    with pytest.raises(ValueError, match="not valid JSON"):
        STUNetConfig.from_json("{not json")
    with pytest.raises(TypeError, match="must be a dict"):
        STUNetConfig.from_dict([1, 2])
    with pytest.raises(FileNotFoundError, match="no config file"):
        STUNetConfig.load(tmp_path)


def test_a_refused_value_is_shown_short():
    """Error messages show a refused value by its repr, shortened; a tensor or an array by its type, shape and
    dtype (its repr is its data: thousands of characters in a message)."""
    import numpy as np
    import torch

    from stunet.config import check_size, shown

    assert shown(7) == "7" and shown("x") == "'x'" and shown(torch.tensor(2)) == "tensor(2)"
    assert shown(torch.zeros(2, 3)) == "a tensor of shape (2, 3) (torch.float32)"
    assert shown(np.zeros((4, 5), np.uint8)) == "an array of shape (4, 5) (uint8)"
    assert len(shown("y" * 10_000)) < 200 and len(shown(list(range(10_000)))) < 200
    with pytest.raises(ValueError) as error:
        check_size("frames", torch.zeros(1, 3, 8, 16, 16), 2)
    assert str(error.value) == ("frames must be a positive multiple of 2 for this model, got a tensor of shape "
                                "(1, 3, 8, 16, 16) (torch.float32)")


def _choice_options():
    import torch

    import stunet.distributed
    import stunet.info
    from stunet import SSROptions, samplers
    from stunet.backends import make_backend
    from stunet.export.tensorrt import toolkit
    from stunet.kernels import group_norm
    from stunet.pipeline.text import tiny_random_t5

    tiny = STUNetConfig.from_preset("tiny")
    model = stunet.STUNet(tiny)
    pipe = stunet.Pipeline(model, tiny_random_t5(tiny.text_dim), progress=False)
    video = torch.zeros(1, 4, 2, 4, 4)
    return {
        "STUNetConfig.prediction": lambda v: STUNetConfig.from_preset("tiny", prediction=v),
        "STUNetConfig.in_channels": lambda v: STUNetConfig.from_preset("tiny", in_channels=v),
        "STUNetConfig.mid_block": lambda v: STUNetConfig.from_preset("tiny", mid_block=(v,)),
        "preset": lambda v: STUNetConfig.from_preset(v),
        "spacing": lambda v: samplers.DDIM(spacing=v),
        "schedule": lambda v: samplers.DDIM(schedule=v),
        "sampler": lambda v: samplers.make_sampler(v),
        "SSROptions.weighting": lambda v: SSROptions(weighting=v),
        "backend": lambda v: make_backend(model, v),
        "runtime": lambda v: stunet.Pipeline(model, runtime=v),
        "output_type": lambda v: pipe("x", output_type=v),
        "scope": lambda v: group_norm(video, 2, torch.ones(4), torch.zeros(4), scope=v),
        "Parallel.frames": lambda v: stunet.distributed.Parallel(frames=v),
        "dtype": lambda v: stunet.info.analyse(tiny, dtype=v),
        "toolkit": lambda v: toolkit(v),
    }


def test_a_choice_refuses_arrays_lists_and_tensors_by_name():
    """A named option (a string or an integer from a fixed set) given an array, a list or a tensor is a ValueError
    naming the option: `in` raised "The truth value of an array ... is ambiguous" or "unhashable type" (or
    `.lower()` an AttributeError) from inside the check."""
    import numpy as np
    import torch

    for name, call in _choice_options().items():
        for value in (np.zeros((2, 2)), ["v"], torch.zeros(2, 2)):
            with pytest.raises(ValueError) as error:
                call(value)
            message = str(error.value)
            assert name in message and "ambiguous" not in message and "unhashable" not in message, (name, message)
