"""The demo cascade shipped with the package (stunet.demo): its weights load strictly, its videos follow their
prompts (measured on the frames: the named colour dominates the object pixels, its centroid moves the named way,
its area grows or shrinks), the same seed gives the same video, and its text encoder refuses unknown words."""
from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from utils import needs_av, read_mp4

from stunet import demo
from stunet.cli import main
from stunet.model.weights import WeightsError
from stunet.pipeline.text import WordEncoder

PROMPTS = ["a red circle moving left", "a blue square moving up", "a yellow triangle moving right",
           "a white square growing on a striped background"]


@pytest.fixture(scope="module")
def pipe():
    return demo.pipeline(progress=False)


@pytest.fixture(scope="module")
def generated(pipe):
    """PROMPTS at the defaults a user gets (32 steps, guidance 7.5, DDIM; the SSR stage included)."""
    return pipe(PROMPTS, seed=0)


def test_the_shipped_weights_load_strictly_and_are_small():
    base, ssr, text = demo.load()
    assert base.config == demo.base_config() and ssr.config == demo.ssr_config()
    assert base.config.num_temporal_downsamples == 2 and base.config.temporal_attn_depth >= 1  # the real design
    assert text.vocab == demo.VOCAB and text.dim == base.config.text_dim == ssr.config.text_dim
    folder = resources.files("stunet.demo") / "weights"
    total = 0
    for name, model in (("base", base), ("ssr", ssr)):
        stored = load_file(str(folder / name / "model.safetensors"))
        assert stored.keys() == model.state_dict().keys()
        total += (folder / name / "model.safetensors").stat().st_size
    assert total < 16 * 2 ** 20


@pytest.mark.slow
def test_generated_videos_follow_their_prompts(generated):
    assert generated.frames.shape == (len(PROMPTS), 16, 64, 64, 3)
    assert generated.low_res_frames.shape == (len(PROMPTS), 16, 16, 16, 3)
    for prompt, frames, low in zip(PROMPTS, generated.frames, generated.low_res_frames):
        for stage, video in (("ssr", frames), ("base", low)):
            r = demo.follows(video, prompt)
            assert r["ok"], f"{stage}: {r}"


def test_the_same_seed_gives_the_same_video(pipe):
    a, b, c = (pipe("a green circle moving down", seed=s, num_inference_steps=2, output_type="pt").frames
               for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_the_measure_agrees_with_the_renderer_and_rejects_other_captions():
    g = torch.Generator().manual_seed(1)
    scenes = [demo.Scene(c, s, m) for c, s, m in (("red", "circle", "left"), ("blue", "triangle", "down"),
                                                   ("white", "square", "shrinking"), ("green", "square", "up"))]
    clips, captions = demo.render(scenes, 16, 16, g)
    opposite = {"left": "right", "down": "up", "shrinking": "growing", "up": "down"}
    for clip, caption, scene in zip(clips, captions, scenes):
        frames = clip.permute(1, 2, 3, 0)
        assert demo.follows(frames, caption)["ok"], caption
        assert not demo.follows(frames, caption.replace(scene.motion, opposite[scene.motion]))["ok"]
        other = "yellow" if scene.color != "yellow" else "red"
        assert demo.follows(frames, caption.replace(scene.color, other))["share"] < 0.1
    with pytest.raises(ValueError, match="not a demo caption"):
        demo.follows(frames, "a dog")


def test_the_word_encoder_refuses_unknown_words_and_round_trips(tmp_path):
    _, _, text = demo.load()
    with pytest.raises(ValueError, match=r"unknown word\(s\) 'bear', 'surfing', 'teddy'.*knows only: a on moving"):
        text.encode(["a red circle", "a teddy bear surfing"])
    ids, mask = text.tokenize(["A RED circle, moving left!", ""])
    assert ids.shape == (2, 5) and mask.tolist() == [[True] * 5, [True, False, False, False, False]]
    assert ids[1, 0] == 0  # the empty prompt is token 0
    text.save(tmp_path)
    again = WordEncoder.load(tmp_path)
    assert again.vocab == text.vocab
    assert torch.equal(again.encode(["a red circle"])[0], text.encode(["a red circle"])[0])
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        WordEncoder.load(tmp_path / "missing")
    for broken, message in (("{not json", r"vocab.json' is not valid JSON \(.+\); save the encoder again"),
                            ('{"vocab": "a b", "dim": 4}', r"vocab.json' must hold \{\"vocab\": \[words\]")):
        (tmp_path / "vocab.json").write_text(broken)
        with pytest.raises(ValueError, match=message):
            WordEncoder.load(tmp_path)
    for vocab in (["a", "a"], [1], "word", np.array([["a", "b"], ["c", "d"]]), torch.zeros(2)):
        with pytest.raises(ValueError, match="vocab must be a list of distinct lower-case words"):
            WordEncoder(vocab, 4)
    with pytest.raises(ValueError, match=r"vocab x dim = 3 x 10{30} is past any device's memory"):
        WordEncoder(["a", "b"], 10 ** 30)  # was torch.empty's overflow
    with pytest.raises(NotADirectoryError, match="WordEncoder.save: '.*vocab.json' exists and is not a directory"):
        text.save(tmp_path / "vocab.json")
    text.save(tmp_path)
    save_file({"embedding": torch.zeros(3, text.dim)}, tmp_path / "embedding.safetensors")
    with pytest.raises(WeightsError, match=r"shape mismatches:\n    embedding: expected \(\d+, \d+\), got \(3, "):
        WordEncoder.load(tmp_path)
    (tmp_path / "embedding.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(WeightsError, match="truncated or not a safetensors file"):
        WordEncoder.load(tmp_path)


@needs_av
def test_the_cli_runs_the_demo_without_a_model(tmp_path, capsys):
    out = tmp_path / "out.mp4"
    assert main(["generate", "a red circle moving left", "-o", str(out), "--steps", "4", "-q"]) == 0
    err = capsys.readouterr().err
    assert "built-in demo cascade" in err and "RANDOM" not in err
    frames = read_mp4(out)
    assert len(frames) == 16 and frames[0].shape == (64, 64, 3)
    with pytest.raises(SystemExit) as e:
        main(["generate", "a teddy bear surfing", "-o", str(tmp_path / "bear.mp4"), "-q"])
    assert e.value.code == 2 and "error: argument PROMPT: prompt 'a teddy bear surfing': unknown word(s) 'bear', " \
        "'surfing', 'teddy'" in capsys.readouterr().err
    assert not (tmp_path / "bear.mp4").exists()


def test_the_training_tool_refuses_bad_values_before_it_trains(tmp_path, capsys, monkeypatch):
    """tools/train_demo.py exits with status 2 naming the option (a learning rate of 0 or an EMA decay above 1
    trained for an hour into useless weights; --check on a wrong folder ended in a traceback)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    train_demo = importlib.import_module("train_demo")
    out = ["--out", str(tmp_path / "out")]
    for args, message in [([*out, "--lr", "0"], "argument --lr: "), ([*out, "--ema", "1.5"], "argument --ema: "),
                          ([*out, "--base-steps", "0"], "argument --base-steps: "),
                          ([*out, "--threads", "-2"], "argument --threads: "),
                          ([*out, "--seed", "x"], "argument --seed: "),
                          (["--check", str(tmp_path)], "--check: "), ([], "give --out DIR"),
                          (["--out", str(Path(__file__))], "argument --out: ")]:
        with pytest.raises(SystemExit) as exit_:
            train_demo.main(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, args
    assert not list(tmp_path.iterdir())
