"""The `stunet` command line: every mode end to end on tiny presets, and every bad argument exits 2 before any
compute with the subcommand's usage and a message naming the argument."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from utils import needs_av, needs_pil, read_mp4, save_png

import stunet
import stunet.cli
from stunet.cli import build_parser, main

QUICK = ["--preset", "tiny", "--steps", "2", "--frames", "4", "-q"]


def _cli(argv, tmp_path, capsys):
    """main(argv) with {tmp} expanded; (exit code, stderr)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


@needs_av
def test_generate_writes_a_video(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code, err = _cli(["generate", "a teddy bear surfing", "-o", str(out), *QUICK], tmp_path, capsys)
    assert code == 0 and len(read_mp4(out)) == 4
    assert "RANDOM weights" in err and f"wrote {out}" in err


@needs_av
@needs_pil
def test_saved_models_and_every_mode(tmp_path, capsys):
    torch.manual_seed(0)
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny-cond")).save_pretrained(tmp_path / "m")
    save_png(np.zeros((16, 16, 3), dtype=np.uint8), tmp_path / "img.png")
    mask = np.zeros((16, 16, 3), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    save_png(mask, tmp_path / "mask.png")
    common = ["--model", str(tmp_path / "m"), "--steps", "2", "-q"]
    runs = [
        ["image-to-video", "x", "-o", "{tmp}/a.gif", "--image", "{tmp}/img.png", "--frames", "4"],
        ["cinemagraph", "x", "-o", "{tmp}/b.mp4", "--image", "{tmp}/img.png", "--region", "{tmp}/mask.png",
         "--frames", "4"],
        ["inpaint", "x", "-o", "{tmp}/c.mp4", "--video", "{tmp}/b.mp4", "--region", "4,4,12,12"],
        ["video-to-video", "x", "-o", "{tmp}/d.mp4", "--video", "{tmp}/b.mp4", "--strength", "0.5"],
        ["video-to-video", "x", "-o", "{tmp}/f.mp4", "--video", "{tmp}/b.mp4", "--height", "32", "--width", "24"],
        ["inpaint", "x", "-o", "{tmp}/g.mp4", "--video", "{tmp}/b.mp4", "--region", "4,4,12,12", "--height", "8",
         "--width", "8"],
        ["image-to-video", "x", "-o", "{tmp}/h.mp4", "--image", "{tmp}/img.png", "--frames", "4", "--height", "24"],
        ["image-to-video", "x", "-o", "{tmp}/e.mp4", "--image", "{tmp}/d.mp4", "--frames", "4"],  # a video's frame 0
    ]
    for argv in runs:
        code, err = _cli([*argv, *common], tmp_path, capsys)
        assert code == 0, err
    assert len(read_mp4(tmp_path / "d.mp4")) == 4
    assert np.asarray(read_mp4(tmp_path / "f.mp4")).shape == (4, 32, 24, 3)  # resized to --height x --width
    assert np.asarray(read_mp4(tmp_path / "g.mp4")).shape == (4, 8, 8, 3)
    assert np.asarray(read_mp4(tmp_path / "h.mp4")).shape == (4, 24, 16, 3)


@needs_av
def test_upscale_raises_a_video_with_the_ssr_model(tmp_path, capsys):
    torch.manual_seed(0)
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).save_pretrained(tmp_path / "base")
    stunet.STUNet(stunet.STUNetConfig.from_preset(
        "tiny", in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
        temporal_attn_depth=0, sample_size=16)).save_pretrained(tmp_path / "ssr")
    code, err = _cli(["generate", "x", "-o", "{tmp}/low.mp4", "--model", "{tmp}/base", "--frames", "4", "--height",
                      "8", "--width", "8", "--steps", "2", "-q"], tmp_path, capsys)
    assert code == 0, err
    code, err = _cli(["upscale", "x", "-o", "{tmp}/high.mp4", "--video", "{tmp}/low.mp4", "--model", "{tmp}/base",
                      "--ssr", "{tmp}/ssr", "--steps", "2", "-q"], tmp_path, capsys)
    assert code == 0, err
    assert np.asarray(read_mp4(tmp_path / "high.mp4")).shape == (4, 16, 16, 3) and "ssr" in err
    assert "SSR model raises" not in err
    code, err = _cli(["upscale", "x", "-o", "{tmp}/higher.mp4", "--video", "{tmp}/high.mp4", "--model", "{tmp}/base",
                      "--ssr", "{tmp}/ssr", "--steps", "1", "-q"], tmp_path, capsys)  # the raised video, again
    assert code == 0 and "stunet: the video is 16x16; this SSR model raises 8x8 videos to 16x16, so it makes 32x32" \
        in err, err
    assert np.asarray(read_mp4(tmp_path / "higher.mp4")).shape == (4, 32, 32, 3)
    # Lossless frames: a cascade's base video (--low-res-output) raised with its seed gives its video.
    cascade = ["--model", "{tmp}/base", "--ssr", "{tmp}/ssr", "--steps", "2", "--seed", "7", "-q"]
    code, err = _cli(["generate", "x", "-o", "{tmp}/full.npy", "--low-res-output", "{tmp}/base.npy", "--frames",
                      "4", "--height", "8", "--width", "8", *cascade], tmp_path, capsys)
    assert code == 0 and f"wrote {tmp_path / 'base.npy'} (the base video, 8x8" in err, err
    code, err = _cli(["upscale", "x", "-o", "{tmp}/again.npy", "--video", "{tmp}/base.npy", *cascade], tmp_path,
                     capsys)
    assert code == 0, err
    full, base, again = (np.load(tmp_path / f"{n}.npy") for n in ("full", "base", "again"))
    assert full.shape == again.shape == (4, 16, 16, 3) and base.shape == (4, 8, 8, 3)
    assert full.dtype == np.float32 and np.abs(again - full).max() < 1e-4


@needs_av
def test_conditional_modes_run_on_the_tiny_cond_preset_by_default(tmp_path, capsys):
    code, err = _cli(["generate", "a ball", "-o", "{tmp}/clip.mp4", *QUICK], tmp_path, capsys)
    assert code == 0, err
    code, err = _cli(["image-to-video", "a ball", "-o", "{tmp}/i2v.mp4", "--image", "{tmp}/clip.mp4",
                      "--steps", "2", "--frames", "4", "-q"], tmp_path, capsys)
    assert code == 0 and "'tiny-cond' preset" in err, err


@needs_av
def test_bf16_runs_through_the_cpp_runtime(tmp_path, capsys):
    code, err = _cli(["generate", "x", "-o", "{tmp}/o.mp4", "--dtype", "bf16", "--runtime", "cpp", *QUICK],
                     tmp_path, capsys)
    assert code == 0, err


def test_a_text_encoder_folder_loads_in_the_runs_dtype_quietly(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    import importlib

    import stunet
    from stunet.pipeline import text

    loaded = []

    def load_text_encoder(*args, **kwargs):
        loaded.append(real(*args, **kwargs))
        return loaded[-1]

    real = text.load_text_encoder
    monkeypatch.setattr(text, "load_text_encoder", load_text_encoder)
    # -q turns the loaders' progress bars off for the process: this test's changes are undone after it
    hub_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")  # the module, not its tqdm class
    transformers_logging = importlib.import_module("transformers.utils.logging")
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(hub_tqdm, "progress_bar_states", dict(hub_tqdm.progress_bar_states))
    monkeypatch.setattr(transformers_logging, "_tqdm_active", transformers_logging._tqdm_active)
    encoder = text.tiny_random_t5(24)
    encoder.model.save_pretrained(tmp_path / "t5")
    encoder.tokenizer.save_pretrained(tmp_path / "t5")
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", text_dim=24)).save_pretrained(tmp_path / "m")
    capsys.readouterr()  # what saving the folders printed
    code, err = _cli(["generate", "a cat", "-o", "{tmp}/o.npy", "--model", "{tmp}/m", "--text-encoder", "{tmp}/t5",
                      "--dtype", "bf16", "--steps", "1", "--frames", "4", "-q"], tmp_path, capsys)
    assert code == 0, err
    assert [e.model.dtype for e in loaded] == [torch.bfloat16] and np.isfinite(np.load(tmp_path / "o.npy")).all()
    assert "Loading weights" not in err and err.startswith("stunet: wrote"), err  # -q: transformers' bars too
    # a model folder's own text_encoder/ is the default, as for Pipeline.from_pretrained
    shutil.copytree(tmp_path / "t5", tmp_path / "m" / "text_encoder")
    code, err = _cli(["generate", "a cat", "-o", "{tmp}/own.npy", "--model", "{tmp}/m", "--steps", "1", "--frames",
                      "4", "--seed", "3"], tmp_path, capsys)
    assert code == 0 and len(loaded) == 2 and "random tiny text encoder" not in err, err
    (tmp_path / "m" / "text_encoder" / "model.safetensors").unlink()
    code, err = _cli(["generate", "a cat", "-o", "{tmp}/none.npy", "--model", "{tmp}/m", "-q"], tmp_path, capsys)
    assert code == 2 and re.search(r"error: could not load the T5 encoder in '.*text_encoder': .*no file named", err)


@pytest.mark.parametrize("argv, message", [
    (["image-to-video", "x", "--image", "{tmp}/odd.npy"], "argument --image: height must be a positive multiple of 4 "
     "for this base model, got 18 (the image's size: --height and --width resize it)"),
    (["video-to-video", "x", "--video", "{tmp}/five.npy"], "argument --video: num_frames must be a positive multiple "
     "of 2 for this base model, got 5 (the video's frame count: trim the video)"),
    (["inpaint", "x", "--video", "{tmp}/odd.npy", "--region", "0,0,4,4"], "argument --video: height must be"),
    (["video-to-video", "x", "--video", "{tmp}/odd.npy", "--height", "18", "--width", "16"],
     "argument --height: height must be a positive multiple of 4 for this base model, got 18\n"),
    (["upscale", "a red circle", "--video", "{tmp}/odd.npy"], "argument --video: height must be a positive multiple "
     "of 4 for this base model, got 18 (the video's size: resize the video)"),  # the demo's SSR stage alone
], ids=["image-side", "video-frames", "video-side", "given-side", "upscale-side"])
def test_a_size_that_the_input_file_sets_is_named_by_its_file(argv, message, tmp_path, capsys):
    """A mode that takes its size from --image or --video names that file for a size the model cannot take, and
    says how to change it: never a flag the command line did not give (or, for --frames, one it refuses)."""
    np.save(tmp_path / "odd.npy", np.zeros((4, 18, 16, 3), np.float32))
    np.save(tmp_path / "five.npy", np.zeros((5, 16, 16, 3), np.float32))
    preset = {"upscale": [], "video-to-video": ["--preset", "tiny"]}.get(argv[0], ["--preset", "tiny-cond"])
    code, err = _cli([*argv, "-o", "{tmp}/o.npy", *preset, "--steps", "1", "-q"], tmp_path, capsys)
    assert code == 2 and message in err + "\n", err


def test_compile_backend_says_its_first_step_compiles(tmp_path, capsys, monkeypatch):
    """torch.compile spends minutes in a model's first step: said before it starts, not left to a progress bar
    that stands still."""
    monkeypatch.setattr("stunet.cli._pixel_pipeline", lambda *args: sys.exit(0))  # the note comes before the models
    code, err = _cli(["generate", "x", "-o", "{tmp}/o.npy", *QUICK, "--backend", "compile"], tmp_path, capsys)
    assert code == 0 and "--backend compile: torch.compile (max-autotune) compiles each model at its first step" in err
    code, err = _cli(["generate", "x", "-o", "{tmp}/o.npy", *QUICK], tmp_path, capsys)
    assert code == 0 and "torch.compile" not in err, err


def test_fp16_on_the_cpu_says_what_it_costs(tmp_path, caplog, capsys):
    with caplog.at_level("WARNING"):
        code, err = _cli(["generate", "x", "-o", "{tmp}/o.npy", "--dtype", "fp16", "--device", "cpu", *QUICK],
                         tmp_path, capsys)
    said = [r.getMessage() for r in caplog.records if "emulate float16" in r.getMessage()]
    assert code == 0 and said == ["stunet: the base model computes in float16 on the CPU, where PyTorch's kernels "
                                  "emulate float16, 15 to 50 times slower than float32 (the CPU's default: "
                                  "dtype=torch.float32, --dtype fp32)"], err
    caplog.clear()
    with caplog.at_level("WARNING"):
        code, err = _cli(["generate", "x", "-o", "{tmp}/o32.npy", *QUICK], tmp_path, capsys)
    assert code == 0 and "emulate float16" not in caplog.text, err


def test_runtime_cpp_is_refused_before_any_model_where_it_cannot_step(tmp_path, capsys, monkeypatch):
    from stunet.sampling import runtime

    monkeypatch.setattr(runtime, "_C", None)
    code, err = _cli(["generate", "x", "-o", "{tmp}/o.npy", "--runtime", "cpp", "--preset", "tiny"],
                     tmp_path, capsys)
    assert code == 2 and "argument --runtime: the C++ runtime stunet._C is not available" in err, err
    assert "or use --runtime python" in err and not (tmp_path / "o.npy").exists()


@needs_pil
@pytest.mark.parametrize("argv,message", [
    (["generate", "x", "-o", "out.avi"], "argument -o/--output: must end in .mp4, .gif or .npy"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--preset", "tiny", "--low-res-output", "{tmp}/l.mp4"],
     "argument --low-res-output: the base video of a cascade; it needs an SSR model"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--low-res-output", "{tmp}/l.avi"],
     "argument --low-res-output: must end in .mp4, .gif or .npy"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--low-res-output", "{tmp}/exists.mp4"],
     "argument --low-res-output: '{tmp}/exists.mp4' exists; pass --overwrite"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--low-res-output", "{tmp}/o.mp4"],
     "argument --low-res-output: the same file as -o/--output"),
    (["upscale", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--low-res-output", "{tmp}/l.mp4"],
     "argument --low-res-output: upscale's low-resolution video is its --video"),
    (["upscale", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/frames.npy"],
     "argument --video: '{tmp}/frames.npy' holds values outside [0, 1]"),
    (["upscale", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/broken.mp4"],
     "argument --video: cannot read '{tmp}/broken.mp4' ("),
    (["video-to-video", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/flat.npy"],
     "holds an array of shape (4, 3), not frames (F, H, W, 3)"),
    (["generate", "x", "-o", "{tmp}"], "argument -o/--output: '{tmp}' is a directory"),
    (["generate", "x", "-o", "{tmp}/d.mp4"], "argument -o/--output: '{tmp}/d.mp4' is a directory"),
    (["generate", "x", "-o", ""], "argument -o/--output: give a file path such as 'out.mp4', got ''"),
    (["generate", "x", "-o", "/nonexistent/out.mp4"], "does not exist"),
    (["generate", "x", "-o", "{tmp}/exists.mp4/o.mp4"], "argument -o/--output: '{tmp}/exists.mp4' is a file, not a "),
    (["export", "onnx", "{tmp}/bad", "-o", "{tmp}/exists.mp4/m.onnx"], "'{tmp}/exists.mp4' is a file, not a "),
    (["export", "aoti", "{tmp}/bad", "-o", "{tmp}/m.pt2", "--device", "cuda:99"],
     "argument --device: CUDA is not available" if not torch.cuda.is_available() else "argument --device: cuda:99 "),
    (["export", "tensorrt", "{tmp}", "-o", "{tmp}/m.plan"], "argument ONNX: '{tmp}' is a directory; give the .onnx "
                                                            "file"),
    (["generate", "x", "-o", "{tmp}/exists.mp4"], "exists; pass --overwrite to replace it"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--model", "/nonexistent"], "argument --model: '/nonexistent' is not a "),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--model", "{tmp}/bad"], "{tmp}/bad/config.json"),
    (["generate", "x", "-o", "{tmp}/o.mp4", *QUICK[:2], "--frames", "3", "-q"],
     "argument --frames: num_frames must be a positive multiple of 2"),
    (["generate", "x", "-o", "{tmp}/o.mp4", *QUICK, "--width", "10"],
     "argument --width: width must be a positive multiple"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--steps", "0"], "argument --steps: must be a positive integer"),
    (["generate", "x", "-o", "{tmp}/o.mp4", *QUICK, "--steps", "5000"],
     "argument --steps: num_inference_steps must be in [1, 1000]"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--guidance", "nan"], "argument --guidance: must be a finite number"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--guidance", "inf"], "argument --guidance: must be a finite number"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--guidance", "-1"], "argument --guidance: must be a finite number >= 0"),
    (["video-to-video", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--strength", "nan"],
     "argument --strength: must be a finite number in (0, 1]"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--seed", "99999999999999999999999"],
     "argument --seed: must be an integer in [0, 2**63)"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--device", "tpu"], "argument --device: must be 'cpu', 'cuda' or"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--bogus", "1"],
     "stunet generate: error: unrecognized arguments: --bogus 1"),
    (["image-to-video", "x", "-o", "{tmp}/o.mp4", "--image", "/nonexistent.png"], "argument --image: no file"),
    (["generate", "x", "-o", "{tmp}/o.mp4", *QUICK, "--max-batch", "1"], "only the fast backend splits batches"),
    (["image-to-video", "x", "-o", "{tmp}/o.mp4", *QUICK, "--image", "{tmp}/i.png"],
     "image_to_video needs a conditional model"),
    (["inpaint", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--region", "4,4,2,2"],
     "argument --region: a box x0,y0,x1,y1 needs x1 > x0"),
    (["inpaint", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--region", "1,2,3"],
     "argument --region: a box is x0,y0,x1,y1: four whole numbers of pixels, got '1,2,3'"),
    (["cinemagraph", "x", "-o", "{tmp}/o.mp4", "--image", "{tmp}/i.png", "--region", "1, 0, 4.5, 4"],
     "argument --region: a box is x0,y0,x1,y1"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--preset", "tiny", "--ssr-steps", "3"],
     "argument --ssr-steps: needs an SSR model"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--preset", "tiny", "--ssr-batch", "1"],
     "argument --ssr-batch: needs an SSR model"),
    (["generate", "x", "-o", "{tmp}/o.mp4", "--ssr-batch", "0"], "argument --ssr-batch: must be a positive integer"),
    (["video-to-video", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--frames", "4"],
     "argument --frames: video-to-video keeps the input video's frame count; drop --frames"),
    (["inpaint", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--region", "1,1,2,2", "--frames", "8"],
     "argument --frames: inpaint keeps the input video's frame count; drop --frames"),
    (["upscale", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--preset", "tiny"],
     "argument --ssr: upscale runs an SSR model"),
    (["upscale", "x", "-o", "{tmp}/o.mp4", "--video", "{tmp}/i.png", "--height", "8"],
     "argument --height: upscale keeps the input video's size; drop --height"),
])
def test_bad_arguments_exit_2_with_the_subcommands_usage(argv, message, tmp_path, capsys):
    save_png(np.zeros((16, 16, 3), dtype=np.uint8), tmp_path / "i.png")
    np.save(tmp_path / "frames.npy", np.full((2, 8, 8, 3), 2.0, dtype=np.float32))
    np.save(tmp_path / "flat.npy", np.zeros((4, 3), dtype=np.float32))
    (tmp_path / "exists.mp4").write_bytes(b"keep")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    (tmp_path / "bad").mkdir()
    (tmp_path / "d.mp4").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"model_channels": -3}')
    code, err = _cli(argv, tmp_path, capsys)
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert f"usage: stunet {argv[0]}" in err  # the subcommand's usage, not the top level's
    assert (tmp_path / "exists.mp4").read_bytes() == b"keep"


@pytest.mark.parametrize("argv, library, message", [
    (["-o", "{tmp}/o.mp4"], "av", "argument -o/--output: writing mp4 needs PyAV: pip install 'stunet[video]' "
                                  "(or write .npy frames)"),
    (["-o", "{tmp}/o.gif"], "PIL", "argument -o/--output: writing gif needs Pillow: pip install 'stunet[video]'"),
    (["-o", "{tmp}/o.npy", "--low-res-output", "{tmp}/l.mp4"], "av",
     "argument --low-res-output: writing mp4 needs PyAV"),
], ids=["mp4", "gif", "low-res-mp4"])
def test_an_output_whose_library_is_missing_is_refused_before_the_generation(argv, library, message, tmp_path,
                                                                            capsys, monkeypatch):
    """Without the [video] extra, -o out.mp4 is a usage error up front, not a traceback after the whole run."""
    monkeypatch.setitem(sys.modules, library, None)  # what an import meets without the library
    built = []
    monkeypatch.setattr("stunet.cli._pixel_pipeline", lambda *args: built.append(args))
    code, err = _cli(["generate", "a red circle", *argv], tmp_path, capsys)
    assert code == 2 and message in err, err
    assert not built and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, message", [
    (["--preset", "tiny"], "argument --preset: a preset's random text encoder is a tiny T5 model, and text "
                           "encoders need transformers: pip install 'stunet[text]'"),
    (["--model", "{tmp}/model"], "argument --model: text encoders need transformers: pip install 'stunet[text]'"),
    (["--model", "{tmp}/model", "--text-encoder", "{tmp}/model"], "argument --text-encoder: text encoders need"),
    (["--image", "{tmp}/image.npy"], "argument --model: without it, image-to-video runs the 'tiny-cond' preset, "
                                     "whose random text encoder is a tiny T5 model, and text encoders need"),
], ids=["preset", "model", "text-encoder", "conditional-mode"])
def test_a_prompt_without_transformers_is_refused_before_any_model_is_built(argv, message, tmp_path, capsys,
                                                                            monkeypatch):
    """Without the [text] extra only the demo cascade, whose encoder ships in the package, reads a prompt: every
    other run is a usage error up front, before the note on random weights and before any weights load."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    np.save(tmp_path / "image.npy", np.zeros((16, 16, 3), np.float32))
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an import meets without transformers
    built = []
    monkeypatch.setattr("stunet.cli._pixel_pipeline", lambda *args: built.append(args))
    command = "image-to-video" if "--image" in argv else "generate"
    code, err = _cli([command, "a red circle", "-o", "{tmp}/o.npy", *argv], tmp_path, capsys)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in err, err
    assert "RANDOM" not in err and not built and not (tmp_path / "o.npy").exists()

    monkeypatch.setattr("stunet.cli._pixel_pipeline", lambda *args: built.append(args) or sys.exit(0))
    code, err = _cli(["generate", "a red circle", "-o", "{tmp}/o.npy"], tmp_path, capsys)  # the demo's own encoder
    assert built, err


def test_out_of_memory_exits_1_saying_where_and_how_to_need_less(tmp_path, capsys, monkeypatch):
    """The demo cascade with --ssr-batch 1 running out of memory in its SSR stage: one message, no traceback,
    status 1, no file; the advice leaves out fewer windows per call, which --ssr-batch 1 already asks for."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("stunet.pipeline.stages.multidiffusion_predict", out_of_memory)
    code, err = _cli(["generate", "a red circle", "-o", "{tmp}/o.mp4", "--steps", "2", "--ssr-batch", "1", "-q"],
                     tmp_path, capsys)
    assert code == 1, err
    assert "stunet: CUDA out of memory. Tried to allocate 2.00 GiB\nstunet: out of memory in the SSR stage" in err
    assert "1 window(s) of" in err and "--backend fast --max-batch 1" in err and "--ssr-batch" not in err
    assert "Traceback" not in err and not (tmp_path / "o.mp4").exists()

    monkeypatch.setattr("stunet.cli._pixel_pipeline", out_of_memory)  # the weights themselves do not fit
    code, err = _cli(["generate", "x", "-o", "{tmp}/o.mp4", *QUICK], tmp_path, capsys)
    assert code == 1 and "stunet: the models do not fit on cpu: CUDA out of memory." in err
    assert "Traceback" not in err and not (tmp_path / "o.mp4").exists()


@needs_av
def test_overwrite_replaces_an_existing_output(tmp_path, capsys):
    (tmp_path / "o.mp4").write_bytes(b"old")
    code, _ = _cli(["generate", "x", "-o", "{tmp}/o.mp4", *QUICK, "--overwrite"], tmp_path, capsys)
    assert code == 0 and len(read_mp4(tmp_path / "o.mp4")) == 4


@needs_av
def test_written_files_follow_the_umask(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        code, _ = _cli(["generate", "x", "-o", "{tmp}/o.mp4", *QUICK], tmp_path, capsys)
    finally:
        os.umask(previous)
    assert code == 0 and (tmp_path / "o.mp4").stat().st_mode & 0o777 == 0o644


def test_ctrl_c_is_one_line_and_ends_by_sigint(tmp_path):
    """SIGINT during generation: one line on stderr, the process ended by SIGINT (a shell shows 130), no output file
    (and no temporary one)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "stunet.cli", "generate", "x", "-o", str(tmp_path / "o.gif"),
                             "--preset", "tiny", "--frames", "64", "--steps", "1000", "-q"],
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if launched with
    # SIGINT ignored (nohup, a background job), the child gets Python's KeyboardInterrupt
    first = proc.stderr.readline()  # printed once the arguments are checked, before the model is built
    assert "RANDOM weights" in first
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == -signal.SIGINT
    assert rest.strip().splitlines() == ["stunet: interrupted"], rest
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", ["raise KeyboardInterrupt", 'exec("raise KeyboardInterrupt")'])
def test_an_interrupt_ends_the_process_by_sigint_wherever_it_lands(tmp_path, monkeypatch, where):
    """The same end for an interrupt raised in plain code and in code made by exec (dataclasses, torch.fx), after
    which CPython would end a `python -m` run by SIGINT and otherwise by the status asked for; main() itself, the
    function, returns 130."""
    (tmp_path / "interrupted_cli.py").write_text(
        "import stunet.cli\n"
        "def interrupted(args):\n"
        f"    {where}\n"
        "stunet.cli.cmd_info = interrupted\n"
        "stunet.cli.run()\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    for launch in (["-m", "interrupted_cli"], [str(tmp_path / "interrupted_cli.py")]):
        proc = subprocess.run([sys.executable, *launch, "info", "tiny"], capture_output=True, text=True, env=env,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), timeout=120)
        ours = [line for line in proc.stderr.splitlines() if line.startswith("stunet")]
        assert (proc.returncode, ours) == (-signal.SIGINT, ["stunet: interrupted"]), (launch, proc.stderr)

    def interrupted(args):
        exec(where)

    monkeypatch.setattr(stunet.cli, "cmd_info", interrupted)
    assert main(["info", "tiny"]) == 130


def test_ctrl_c_stops_a_shell_loop_that_runs_the_command(tmp_path):
    """A terminal's Ctrl-C goes to the whole foreground group: the shell running a loop of stunet commands sees its
    command ended by SIGINT and stops, instead of going on to the next one (as it would after an exit status)."""
    (tmp_path / "waiting_cli.py").write_text(
        "import time, stunet.cli\n"
        "def waiting(args):\n"
        "    print('waiting', flush=True)\n"
        "    time.sleep(120)\n"
        "stunet.cli.cmd_info = waiting\n"
        "stunet.cli.run()\n")
    loop = f'for i in 1 2; do "{sys.executable}" -m waiting_cli info tiny; echo "after $i"; done'
    shell = subprocess.Popen(["bash", "-c", loop], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while (line := shell.stdout.readline()) != "waiting\n":
        assert line, "the loop ended before its first command ran"
    os.killpg(shell.pid, signal.SIGINT)
    out, _ = shell.communicate(timeout=60)
    assert shell.returncode == -signal.SIGINT and "after" not in out, out
    assert [line for line in out.splitlines() if line.startswith("stunet")] == ["stunet: interrupted"], out


def test_the_stunet_program_is_run():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="stunet")
    assert script.value == "stunet.cli:run"
    # and as `python -m stunet`, the same program: its exit statuses too
    version = subprocess.run([sys.executable, "-m", "stunet", "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"stunet {stunet.__version__}", version.stderr
    refused = subprocess.run([sys.executable, "-m", "stunet", "info", "tiny", "--frames", "0"], capture_output=True,
                             text=True)
    assert refused.returncode == 2 and "argument --frames: must be a positive integer" in refused.stderr


def test_started_in_the_checkout_the_installed_kernels_package_keeps_its_name(tmp_path):
    """`python -m stunet` started in the source checkout, or a bench script: a top-level `import kernels` gets the
    installed package of that name (Hugging Face's, which transformers imports), not the checkout's kernels/
    folder (stunet.kernels) or bench/kernels.py (`stunet convert` and `generate` failed inside transformers).
    The finder on a checkout laid out in tmp_path, then `import stunet` in this one where it is the editable
    install's."""
    installed, fake = tmp_path / "site-packages", tmp_path / "checkout"
    for folder, who in ((installed, "installed"), (fake, "checkout")):
        (folder / "kernels").mkdir(parents=True)
        (folder / "kernels" / "__init__.py").write_text(f"WHO = {who!r}\n")
    (fake / "bench").mkdir()
    (fake / "bench" / "kernels.py").write_text("WHO = 'bench'\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(installed), os.environ.get("PYTHONPATH")]))}
    finder = ("import sys; from pathlib import Path; from stunet._checkout import InstalledKernelsFinder; "
              f"sys.meta_path.insert(0, InstalledKernelsFinder(Path({str(fake.resolve())!r}))); ")
    for cwd, code, want in [(fake, "import kernels; print(kernels.WHO)", "checkout"),  # the shadow, unmended
                            (fake, finder + "import kernels; print(kernels.WHO)", "installed"),
                            (fake / "bench", finder + "import kernels; print(kernels.WHO)", "installed")]:
        run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
        assert run.stdout.strip() == want, (cwd, code, run.stderr[-2000:])
    checkout = Path(stunet.kernels.__file__).resolve().parent.parent
    editable = (checkout / "bench" / "kernels.py").is_file()  # a wheel's stunet/ holds no bench/ to hide a name
    for cwd in (checkout, checkout / "bench") if editable else ():
        code = "import stunet, kernels; print(kernels.WHO, stunet.kernels.SCOPES)"
        run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
        assert run.stdout.strip() == "installed ('frame', 'clip')", (cwd, run.stderr[-2000:])


def test_version_and_help_for_every_argument(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"stunet {stunet.__version__}"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"info", "env", "generate", "image-to-video", "inpaint", "cinemagraph",
                               "video-to-video", "upscale", "export", "convert"}
    nested = next(a for a in subparsers["export"]._actions if a.dest == "route").choices
    for name, sub in [*subparsers.items(), *((f"export {k}", v) for k, v in nested.items())]:
        assert sub.description, f"stunet {name} has no description"
        for action in sub._actions:
            assert action.help, f"stunet {name} {action.option_strings or action.dest} has no help"


def test_choices_come_from_the_registries():
    generate = next(a for a in build_parser()._actions if a.dest == "command").choices["generate"]
    choices = {a.dest: a.choices for a in generate._actions if a.choices}
    assert set(choices["sampler"]) == set(stunet.samplers.SAMPLERS)
    assert set(choices["backend"]) == set(stunet.backends.BACKENDS)
    assert set(choices["preset"]) == set(stunet.PRESETS)


def test_empty_prompt_warns(tmp_path, caplog, capsys):
    import logging

    with caplog.at_level(logging.WARNING):
        code, _ = _cli(["generate", "", "-o", "{tmp}/o.gif", *QUICK], tmp_path, capsys)
    assert code == 0 and any("empty prompt" in r.getMessage() for r in caplog.records)


def test_fast_backend_on_a_cpu_says_what_it_runs(tmp_path, caplog, capsys, monkeypatch):
    """Once, for the demo cascade's two models."""
    import logging

    import stunet.backends.fast as fast_module

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(fast_module, "_KERNEL_NOTES_SAID", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING):
        code, _ = _cli(["generate", "a red circle", "-o", "{tmp}/o.gif", "--steps", "2", "-q", "--backend", "fast"],
                       tmp_path, capsys)
    notes = [r.getMessage() for r in caplog.records if "fast backend" in r.getMessage()]
    assert code == 0 and len(notes) == 1 and "reference math" in notes[0], notes


def test_env_says_what_runs_where(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "stunet runtime: C++" in out
    assert "no CUDA device is visible: the ops (and --backend fast) run their reference math" in out
    assert re.search(r"^\[export\] +onnx [0-9.]+, onnxscript [0-9.]+, onnxruntime [0-9.]+: ONNX export", out, re.M), out

    from stunet.kernels import _triton

    monkeypatch.setattr(_triton, "triton", None)
    monkeypatch.setattr(_triton, "IMPORT_ERROR", "ModuleNotFoundError: No module named 'triton'")
    assert main(["env"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("triton kernels"))
    assert line.endswith("unavailable (ModuleNotFoundError: No module named 'triton'); the ops run their reference "
                         "math (pip install 'stunet[triton]')"), line


def test_without_triton_importing_stunet_says_nothing():
    """torch logs "Triton not available" while it registers each Triton op when Triton is missing; stunet's
    registration keeps that quiet (``stunet env`` tells the absence) and leaves torch's logger as it was."""
    code = ("import sys, logging; sys.modules['triton'] = None; import stunet.kernels.ops; "
            "from stunet.kernels import _triton; "
            "print(_triton.triton is None, logging.getLogger('torch._library.triton').level)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert (run.returncode, run.stdout, run.stderr) == (0, "True 0\n", "")


@pytest.mark.parametrize("capability", [(7, 5), (9, 0)])
def test_env_says_whether_the_kernels_run_on_the_gpu(capability, capsys, monkeypatch):
    from types import SimpleNamespace

    from stunet.kernels import _triton, ops

    gpu = SimpleNamespace(name="a GPU", major=capability[0], minor=capability[1], total_memory=16 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: gpu)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    monkeypatch.setattr(ops, "_capabilities", {})
    assert main(["env"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"a GPU (and 1 more): compute capability {capability[0]}.{capability[1]}, 16 GiB (CUDA" in out[3], out
    line = next(line for line in out if line.startswith("triton kernels"))
    if _triton.triton is None:  # no kernels on any device
        assert "unavailable" in line, line
    elif capability < (8, 0):
        assert "run their reference math on this device: compute capability 7.5" in line, line
    else:
        assert line.endswith("the kernels run on the CUDA device"), line


def test_env_names_every_extra_and_what_a_missing_one_takes(capsys, monkeypatch):
    """One line per extra of the installed package (every extra but test's and triton's, which has its own line),
    from the package's metadata: a missing requirement is named with the command that installs it."""
    from importlib import metadata

    from stunet.cli import EXTRAS, extras_status

    assert set(metadata.metadata("stunet").get_all("Provides-Extra")) - {"test", "triton"} == set(EXTRAS)
    installed = metadata.version

    def version(name: str) -> str:
        if name == "onnxscript":
            raise metadata.PackageNotFoundError(name)
        return installed(name)

    monkeypatch.setattr(metadata, "version", version)
    status = extras_status()
    assert set(status) == set(EXTRAS)
    assert status["export"] == ("onnxscript not installed: pip install 'stunet[export]' for ONNX export and its "
                                "onnxruntime check")
    assert status["text"].startswith(f"transformers {installed('transformers')}: ")
    # A version older than setup.py's requirement is named with the requirement and the command that upgrades it.
    monkeypatch.setattr(metadata, "version", lambda name: "0.5.7" if name == "onnxscript" else installed(name))
    assert extras_status()["export"] == ("onnxscript 0.5.7 (needs >=0.6.2): pip install -U 'stunet[export]' for ONNX "
                                         "export and its onnxruntime check")


def test_env_says_an_extra_for_other_platforms_is_not_available_here(monkeypatch):
    """tensorrt-rtx's wheels are for x86-64 only: on an ARM machine (a Jetson) the extra is not available at all,
    though its other requirement (onnx) may be installed."""
    from packaging import markers  # pytest's own dependency

    from stunet.cli import extras_status

    evaluate = markers.Marker.evaluate
    monkeypatch.setattr(markers.Marker, "evaluate", lambda self, environment=None, **kw: evaluate(
        self, {**(environment or {}), "platform_machine": "aarch64"}, **kw))
    status = extras_status()
    assert status["tensorrt-rtx"] == "not available on this platform (TensorRT-RTX engine builds, without a GPU)"
    assert status["export"].startswith("onnx ")


def test_info_errors_use_the_info_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["info", "no-such-preset"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "usage: stunet info" in err and "is neither a preset" in err
