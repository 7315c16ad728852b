"""`stunet info`: the analytic FLOP counter against a measured count, presets' figures, the command line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from utils import make_inputs

import stunet
from stunet.cli import main
from stunet.info import analyse


def measured_flops(model, *args, **kwargs) -> int:
    # The math SDPA backend decomposes attention into matmuls that the flop counter sees.
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("overrides,frames,size,text_len", [
    ({}, 8, 16, 5),
    ({}, 2, 12, 3),
    ({"in_channels": 6, "noise_aug": True, "low_res_size": 8, "temporal_attn_depth": 0}, 4, 8, 7),
    ({"norm_scope": "clip", "attention_levels": (0, 1, 2)}, 4, 8, 1),
], ids=["tiny", "tiny-odd-size", "tiny-ssr", "tiny-attn-everywhere"])
def test_analytic_flops_match_the_measured_count(overrides, frames, size, text_len):
    cfg = stunet.STUNetConfig.from_preset("tiny", **overrides)
    model = stunet.STUNet(cfg).eval()
    x, t, text = make_inputs(cfg, batch=2, frames=frames, size=size, text_len=text_len)
    analytic = model.flops(2, frames, size, size, text_len)
    measured = measured_flops(model, x, t, text)
    assert abs(analytic - measured) <= 0.05 * measured, (analytic, measured)


def test_lumiere_base_is_about_90_tflop_per_forward():
    info = analyse(stunet.STUNetConfig.from_preset("lumiere-base"), "lumiere-base")
    assert (info.frames, info.height, info.width) == (80, 128, 128)
    assert 85e12 <= info.flops <= 95e12
    assert 1.0e9 < info.parameters < 2.0e9 and 0 < info.temporal_parameters < info.parameters
    assert [(lv["T"], lv["H"], lv["C"]) for lv in info.levels] == [
        (80, 128, 256), (40, 64, 512), (20, 32, 768), (10, 16, 1024), (5, 8, 1024)]


def test_parameter_count_matches_the_built_model(tiny_model):
    info = analyse(tiny_model.config, "tiny")
    assert info.parameters == sum(p.numel() for p in tiny_model.parameters())
    assert info.temporal_parameters == sum(p.numel() for _, m in tiny_model.temporal_modules()
                                           for p in m.parameters())


def test_activation_estimate_scales_with_the_input():
    cfg = stunet.STUNetConfig.from_preset("small")
    one = analyse(cfg, batch=1).activation_bytes
    assert analyse(cfg, batch=2).activation_bytes == 2 * one
    assert analyse(cfg, dtype="fp32").activation_bytes == 2 * one
    assert analyse(cfg, frames=2 * cfg.sample_frames).activation_bytes > one


@pytest.mark.parametrize("preset", list(stunet.PRESETS))
def test_cli_info_prints_every_preset(preset, capsys):
    assert main(["info", preset]) == 0
    out = capsys.readouterr().out
    assert "parameters" in out and "FLOPs/forward" in out and "level      T      H      W      C" in out


def test_cli_info_json(capsys):
    assert main(["info", "lumiere-base", "--json", "--frames", "16", "--batch", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["frames"] == 16 and data["batch"] == 2 and data["config"]["text_dim"] == 4096
    assert data["levels"][-1]["T"] == 1


def test_cli_info_reads_a_model_directory(tiny_model, tmp_path, capsys):
    tiny_model.save_pretrained(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    assert "in_channels 3" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["info", "huge"], "argument PRESET: 'huge' is neither a preset"),
    (["info", "lumiere-base", "--frames", "7"], "argument --frames: frames must be a positive multiple of 16"),
    (["info", "tiny", "--height", "0"], "argument --height: must be a positive integer, got 0"),
    (["info", "tiny", "--dtype", "int8"], "argument --dtype: invalid choice"),
])
def test_cli_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_runs():
    proc = subprocess.run([sys.executable, "-m", "stunet.cli", "info", "tiny"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "tiny:" in proc.stdout
