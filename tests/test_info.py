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
from stunet.model import FAST, forward_peak_bytes


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


def tracker_peak(cfg, batch, frames, size, text_len, policy) -> int:
    """torch's own MemTracker (torch.distributed._tools) on the same meta forward: its activation and temporary
    bytes at the peak."""
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    from stunet.model.memory import FusedAttention, meta_forward

    model, args = meta_forward(cfg, batch=batch, frames=frames, height=size, width=size, text_len=text_len)
    tracker = MemTracker()
    tracker.track_external(model, *(a for a in args if a is not None))
    with torch.no_grad(), FusedAttention(), tracker:
        model.forward_checked(*args, policy)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("meta")]
    return peak[_MemRefType.ACT] + peak[_MemRefType.TEMP]


@pytest.mark.parametrize("policy", ["reference", "fast"])
@pytest.mark.parametrize("overrides,frames,size", [
    ({}, 8, 16),
    ({}, 2, 12),
    ({"in_channels": 6, "noise_aug": True, "low_res_size": 8}, 4, 8),
    ({"norm_scope": "clip", "attention_levels": (0, 1, 2)}, 4, 8),
], ids=["tiny", "tiny-odd-size", "tiny-ssr", "tiny-attn-everywhere"])
def test_simulated_activation_peak_equals_torch_mem_tracker(overrides, frames, size, policy):
    """The simulation's live-storage count is torch's MemTracker's figure for the same forward, to the byte."""
    from stunet.info import POLICIES

    cfg = stunet.STUNetConfig.from_preset("tiny", **overrides)
    got = forward_peak_bytes(cfg, batch=2, frames=frames, height=size, width=size, text_len=5,
                             policy=POLICIES[policy])
    assert got == tracker_peak(cfg, 2, frames, size, 5, POLICIES[policy]) > 0


def test_simulated_activation_peak_of_the_presets():
    """lumiere-base's CFG pair (2 x 80 x 128 x 128): the fast policy holds about half the reference's
    activations (no fp32 copies for the norms and attention); attention holds no L x L scores (fused, as on a
    GPU); the peak grows with the batch and the frames and halves from fp32 to fp16 on the fast path."""
    info = analyse(stunet.STUNetConfig.from_preset("lumiere-base"), "lumiere-base", batch=2)
    ref, fast = info.activation_bytes["reference"], info.activation_bytes["fast"]
    assert 25e9 < ref < 35e9 and 0.4 < fast / ref < 0.6, (ref, fast)
    # 13.4 GB at the last level's first ResBlock: three skips, the concat, its norm and conv1's output; the
    # level below's output is released by then (held while the stage ran, it was 16.1 GB)
    assert fast < 14e9, fast
    cfg = stunet.STUNetConfig.from_preset("small", attention_levels=(0, 1, 2))
    geometry = dict(batch=1, frames=16, height=64, width=64)
    fast16 = forward_peak_bytes(cfg, **geometry, policy=FAST)
    heads = cfg.level_channels[0] // cfg.attention_head_dim
    scores = 16 * heads * (64 * 64) ** 2 * 2  # level 0's spatial attention scores in fp16, per clip
    assert fast16 < scores
    assert forward_peak_bytes(cfg, **{**geometry, "batch": 2}, policy=FAST) > 1.9 * fast16
    assert forward_peak_bytes(cfg, **{**geometry, "frames": 32}, policy=FAST) > 1.9 * fast16
    assert forward_peak_bytes(cfg, **geometry, dtype=torch.float32, policy=FAST) == 2 * fast16


def test_a_decoder_stage_releases_its_input_after_its_first_block():
    """The concat a decoder stage starts from (the widest tensor of its level) is held by its first block alone:
    when the second block runs, nothing holds it (nor the level below's output or the skip it was made of)."""
    from stunet.model.memory import FusedAttention, LiveBytes, meta_forward

    cfg = stunet.STUNetConfig.from_preset("tiny", attention_levels=(0, 1))
    model, args = meta_forward(cfg, batch=1, frames=8, height=16, width=16, text_len=5)
    inputs, held = {}, []
    stages = [(i, list(stage)) for i, stage in enumerate(model.decoder) if len(stage) > 1]
    for i, (first, second, *_) in stages:
        first.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].untyped_storage()._cdata))
        second.register_forward_pre_hook(lambda m, a, i=i: held.append((i, inputs[i] in live._storages)))
    with torch.no_grad(), FusedAttention(), LiveBytes([*model.parameters(), *args[:3]]) as live:
        model.forward_checked(*args, FAST)
    assert len(held) == len(stages) >= 4 and not any(h for _, h in held), held


def test_the_simulation_leaves_other_threads_alone():
    """While one thread simulates (its attention a stand-in that allocates an empty output), attention in another
    thread computes: the modes belong to the thread that entered them."""
    import threading

    from stunet.model.memory import FusedAttention, LiveBytes

    entered, done = threading.Event(), threading.Event()

    def simulate():
        with FusedAttention(), LiveBytes([]):
            entered.set()
            done.wait(30)

    worker = threading.Thread(target=simulate)
    worker.start()
    try:
        assert entered.wait(30)
        q = torch.randn(1, 2, 5, 8, generator=torch.Generator().manual_seed(0))
        got = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        want = torch.softmax(q @ q.transpose(-1, -2) / 8 ** 0.5, dim=-1) @ q
        torch.testing.assert_close(got, want)
    finally:
        done.set()
        worker.join()


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


def test_cli_info_refuses_more_frames_than_the_temporal_encoding_takes(tmp_path, capsys):
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", temporal_max_frames=8)).save_pretrained(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["info", str(tmp_path), "--frames", "16"])
    assert info.value.code == 2
    assert "argument --frames: frames must be at most 8 for this model" in capsys.readouterr().err


def test_analyse_takes_sizes_as_given_and_none_for_the_models_own():
    cfg = stunet.STUNetConfig.from_preset("lumiere-ssr")
    own = analyse(cfg)
    assert (own.frames, own.height, own.width) == (cfg.call_frames, cfg.sample_size, cfg.sample_size)
    assert cfg.call_frames == cfg.window_frames == 16  # an SSR model's call is one window of its clip
    for kwargs, message in [(dict(frames=0), "frames must be a positive integer, got 0"),
                            (dict(height=0), "height must be a positive multiple of 16 for this model, got 0"),
                            (dict(width=64.0), "width must be a positive multiple of 16 for this model, got 64.0"),
                            (dict(batch=0), "batch must be a positive integer, got 0"),
                            (dict(batch=2.5), "batch must be a positive integer, got 2.5"),
                            (dict(text_len="77"), "text_len must be a positive integer, got '77'")]:
        with pytest.raises(ValueError, match=message):
            analyse(cfg, **kwargs)


@pytest.mark.parametrize("argv,message", [
    (["info", "huge"], "argument PRESET: 'huge' is neither a preset"),
    (["info", "lumiere-base", "--frames", "7"], "argument --frames: frames must be a positive multiple of 16"),
    (["info", "tiny", "--height", "0"], "argument --height: must be a positive integer, got 0"),
    (["info", "tiny", "--dtype", "int8"], "argument --dtype: invalid choice"),
    (["info", "tiny", "--batch", str(10 ** 21)],  # the sizes of a tensor past any device: each one's flag
     f"argument --batch/--frames/--height/--width: batch x frames x height x width x channels = {10 ** 21} x 8 x "
     "16 x 16 x 16 is past any device's memory"),
    (["info", "tiny", "--text-len", str(2 ** 40)],
     f"argument --batch/--text-len: batch x text_len x text_dim = 1 x {2 ** 40} x 24 is past any device's memory"),
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
