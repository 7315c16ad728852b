"""Video files and text encoders."""
from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from utils import needs_av, needs_pil, read_mp4

from stunet.pipeline.text import HFTextEncoder, WordEncoder, load_text_encoder, tiny_random_t5
from stunet.pipeline.video import load_npy, read_frames, save_video


@pytest.mark.parametrize("shape", [(5, 16, 24, 3), (3, 15, 9, 3), (1, 8, 8, 3)], ids=["even", "odd", "single"])
@needs_av
def test_mp4_round_trip(tmp_path, shape, caplog):
    frames = np.random.default_rng(0).random(shape, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="stunet.pipeline.video"):
        save_video(frames, tmp_path / "a.mp4", fps=8)
    back = read_mp4(tmp_path / "a.mp4")
    h, w = shape[1] + shape[1] % 2, shape[2] + shape[2] % 2  # odd sides are padded for yuv420p, and it says so
    assert len(back) == shape[0] and back[0].shape == (h, w, 3)
    padded = [r.getMessage() for r in caplog.records if "padded" in r.getMessage()]
    assert padded == ([f"a.mp4: H.264 (yuv420p) takes even sides only, so the {shape[2]}x{shape[1]} frames are padded "
                       f"to {w}x{h} (edge pixels repeated); save a .gif or .npy for the exact size"]
                      if (h, w) != shape[1:3] else [])


def test_mp4_without_pyav_names_the_extra_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # what `import av` meets without PyAV
    with pytest.raises(ImportError, match=r"writing mp4 needs PyAV: pip install 'stunet\[video\]'"):
        save_video(np.zeros((2, 8, 8, 3), dtype=np.float32), tmp_path / "a.mp4")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("name, library, package", [("a.mp4", "av", "PyAV"), ("a.png", "PIL", "Pillow")])
def test_reading_without_its_library_names_the_package_and_the_extra(name, library, package, tmp_path, monkeypatch):
    (tmp_path / name).write_bytes(b"frames")
    monkeypatch.setitem(sys.modules, library, None)
    wanted = rf"^reading .{name[2:]} files needs {package}: pip install 'stunet\[video\]'$"
    with pytest.raises(ImportError, match=wanted):
        read_frames(tmp_path / name)


@needs_pil
def test_gif_round_trip(tmp_path):
    frames = (np.random.default_rng(0).random((6, 10, 12, 3)) * 255).astype(np.uint8)
    save_video(frames, tmp_path / "a.gif", fps=10)
    from PIL import Image

    img = Image.open(tmp_path / "a.gif")
    assert img.n_frames == 6 and img.size == (12, 10)


def test_npy_keeps_the_frames_exactly(tmp_path):
    """npy holds float32 frames in [0, 1] bit for bit (uint8 frames scaled by 1/255), written atomically;
    ``load_npy`` reads frames and images back and names what else a file holds."""
    frames = np.random.default_rng(0).random((3, 5, 7, 3), dtype=np.float32)
    save_video(torch.from_numpy(frames), tmp_path / "a.npy")
    assert [f.name for f in tmp_path.iterdir()] == ["a.npy"]  # no temporary left, no doubled suffix
    assert np.array_equal(load_npy(tmp_path / "a.npy"), frames) and np.load(tmp_path / "a.npy").dtype == np.float32
    save_video((frames * 255).astype(np.uint8), tmp_path / "b.npy")
    assert np.array_equal(load_npy(tmp_path / "b.npy"), (frames * 255).astype(np.uint8) / np.float32(255))
    np.save(tmp_path / "image.npy", (frames[0] * 255).astype(np.uint8))
    assert load_npy(tmp_path / "image.npy").shape == (5, 7, 3)
    for name, data, message in [("grey", np.zeros((2, 4, 4)), r"shape \(2, 4, 4\), not frames"),
                                ("ints", np.zeros((2, 4, 4, 3), dtype=np.int64), "int64 values"),
                                ("range", np.full((2, 4, 4, 3), -0.5), r"outside \[0, 1\]")]:
        np.save(tmp_path / f"{name}.npy", data)
        with pytest.raises(ValueError, match=message):
            load_npy(tmp_path / f"{name}.npy")
    (tmp_path / "text.npy").write_text("not numpy")
    (tmp_path / "empty.npy").write_bytes(b"")
    for name in ("text", "empty"):
        with pytest.raises(ValueError, match="is not a numpy array file"):
            load_npy(tmp_path / f"{name}.npy")


@needs_av
@needs_pil
def test_read_frames_reads_what_save_video_writes_and_images(tmp_path):
    """Videos (F, H, W, 3) and images (H, W, 3) as floats in [0, 1]: npy exactly, gif and png to the 8-bit value,
    mp4 through its lossy codec; no file and a file that is not what its name says are refused by name."""
    from PIL import Image

    frames = np.random.default_rng(0).random((4, 16, 24, 3), dtype=np.float32)
    quantised = np.round(frames * 255) / np.float32(255)
    for suffix in (".npy", ".gif", ".mp4"):
        save_video(frames if suffix == ".npy" else quantised, tmp_path / f"a{suffix}", fps=8)
        back = read_frames(tmp_path / f"a{suffix}")
        assert back.shape == frames.shape and back.dtype == np.float32 and 0 <= back.min() <= back.max() <= 1
    assert np.array_equal(read_frames(tmp_path / "a.npy"), frames)
    Image.fromarray((quantised[0] * 255).round().astype(np.uint8)).save(tmp_path / "a.png")
    assert np.array_equal(read_frames(str(tmp_path / "a.png")), quantised[0])
    assert np.abs(read_frames(tmp_path / "a.mp4") - frames).mean() < 0.2  # H.264 of noise: coarse, but these
    with pytest.raises(FileNotFoundError, match="no file at"):
        read_frames(tmp_path / "missing.mp4")
    with pytest.raises(FileNotFoundError, match="is a directory; give a video or image file in it"):
        read_frames(tmp_path)
    for name in ("broken.mp4", "broken.png"):
        (tmp_path / name).write_bytes(b"not an image")
        with pytest.raises(ValueError, match=f"cannot read '.*{name}'"):
            read_frames(tmp_path / name)


@needs_pil
def test_save_video_errors_and_atomicity(tmp_path, monkeypatch):
    frames = np.zeros((2, 8, 8, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="path must end in one of"):
        save_video(frames, tmp_path / "a.avi")
    with pytest.raises(ValueError, match=r"frames must be \(F, H, W, 3\).*res.frames\[0\]"):
        save_video(frames[None], tmp_path / "a.mp4")
    with pytest.raises(ValueError, match="NaN"):
        save_video(np.full((2, 8, 8, 3), np.nan, dtype=np.float32), tmp_path / "a.mp4")
    for suffix in (".mp4", ".gif", ".npy"):
        with pytest.raises(ValueError, match=r"frames is empty: shape \(2, 0, 8, 3\)"):
            save_video(np.zeros((2, 0, 8, 3), dtype=np.float32), tmp_path / f"a{suffix}")
    with pytest.raises(ValueError, match="fps must be a positive integer"):
        save_video(frames, tmp_path / "a.mp4", fps=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_video(frames, tmp_path / "missing" / "a.mp4")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(NotADirectoryError, match="a_file' is a file, not a directory"):
        save_video(frames, tmp_path / "a_file" / "a.mp4")
    (tmp_path / "a_file").unlink()
    save_video(frames, tmp_path / "keep.gif")
    before = (tmp_path / "keep.gif").read_bytes()

    def broken(data, path, fps):
        path.write_bytes(b"half")
        raise RuntimeError("encoder crashed")

    monkeypatch.setattr("stunet.pipeline.video._write_gif", broken)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        save_video(frames + 1, tmp_path / "keep.gif")
    assert (tmp_path / "keep.gif").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.gif"]


def test_frames_outside_0_1_are_clipped_with_a_warning(tmp_path, caplog):
    """Floats in [0, 255] or [-1, 1] are the usual slips: clipped, they would make a white or a dark video in
    silence. Overshoots that rounding to 8 bits hides pass quietly."""
    frames = np.random.default_rng(0).random((2, 8, 8, 3), dtype=np.float32)
    with caplog.at_level("WARNING", logger="stunet"):
        save_video(frames * (1 + 1 / 512), tmp_path / "quiet.gif")
        assert not caplog.records
        save_video(frames * 255, tmp_path / "loud.npy")
    assert "which are clipped to [0, 1]" in caplog.text and "divide [0, 255] values by 255" in caplog.text
    assert np.load(tmp_path / "loud.npy").max() == 1.0


def test_tiny_t5_is_deterministic_and_masks_padding():
    a, b = tiny_random_t5(24, seed=0), tiny_random_t5(24, seed=0)
    tokens, mask = a.encode(["a teddy bear surfing", "hi"])
    assert tokens.shape == (2, 21, 24) and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [21, 3]  # ByT5: one token per byte + end of sequence
    assert torch.equal(tokens, b.encode(["a teddy bear surfing", "hi"])[0])
    assert not torch.equal(tokens, tiny_random_t5(24, seed=1).encode(["a teddy bear surfing", "hi"])[0])
    with pytest.raises(TypeError, match="prompts must be a list of strings"):
        a.encode("a teddy bear")


def test_text_encoders_load_from_a_local_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    enc = tiny_random_t5(24, seed=0)
    enc.model.save_pretrained(tmp_path / "t5")
    enc.tokenizer.save_pretrained(tmp_path / "t5")
    loaded = load_text_encoder(tmp_path / "t5")
    assert torch.equal(loaded.encode(["abc"])[0], enc.encode(["abc"])[0])
    padded = load_text_encoder(tmp_path / "t5", max_length=16, pad_to_max_length=True)  # one shape per request
    for prompts in (["abc"], ["a longer prompt", ""]):
        tokens, mask = padded.encode(prompts)
        assert tokens.shape == (len(prompts), 16, 24) and mask.shape == (len(prompts), 16)
        assert mask[0].sum() == len(prompts[0].encode()) + 1  # bytes and the end-of-text token

    clip_cfg = transformers.CLIPTextConfig(vocab_size=384, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                                           eos_token_id=1, pad_token_id=0, bos_token_id=2)
    torch.manual_seed(0)
    transformers.CLIPTextModel(clip_cfg).save_pretrained(tmp_path / "clip")
    transformers.ByT5Tokenizer().save_pretrained(tmp_path / "clip")
    clip = load_text_encoder(tmp_path / "clip")
    tokens, mask = clip.encode(["a cat", "a teddy bear"])
    assert isinstance(clip, HFTextEncoder) and clip.dim == 32 and tokens.shape[::2] == (2, 32)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_text_encoder(tmp_path / "none")
    with pytest.raises(TypeError, match="pad_to_max_length must be True or False or None, got 'yes'"):
        load_text_encoder(tmp_path / "t5", pad_to_max_length="yes")
    for bad in (0, -4, 2.5, "16"):  # refused before any file is read
        with pytest.raises(ValueError, match=f"max_length must be a positive number of tokens or None, got {bad!r}"):
            load_text_encoder(tmp_path / "none", max_length=bad)


def test_an_encoder_refuses_bad_options_and_an_empty_prompt_list():
    """HFTextEncoder's options are checked as it is built (a max_length of 0 encoded whole prompts unnoticed,
    pad_to_max_length="no" padded); every encoder refuses an empty prompt list by name (a tokenizer's or max()'s
    error before)."""
    enc = tiny_random_t5(24, seed=0)
    for options, error, message in [(dict(max_length=0), ValueError, "max_length must be a positive number"),
                                    (dict(max_length=8.0), ValueError, "max_length must be a positive number"),
                                    (dict(pad_to_max_length="no"), TypeError, "pad_to_max_length must be True"),
                                    (dict(attend_padding=1), TypeError, "attend_padding must be True"),
                                    (dict(device="tpu"), ValueError, "device must be a device such as")]:
        with pytest.raises(error, match=message):
            HFTextEncoder(enc.model, enc.tokenizer, **options)
    for encoder in (enc, WordEncoder(["a", "cat"], 8)):
        with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
            encoder.encode([])
        with pytest.raises(TypeError, match="prompts must be a list of strings, got NoneType"):
            encoder.encode(None)
        assert encoder.encode(("a cat",))[0].shape[0] == 1


def test_text_encoders_load_in_the_dtype_asked(tmp_path):
    """``dtype=`` loads a text encoder's weights in it (a T5-XXL is 19 GB in fp32), and a pipeline loaded with a
    dtype gives it to the text encoder it loads from a folder, as to its models; its tokens are the model's."""
    import stunet

    pytest.importorskip("transformers")
    enc = tiny_random_t5(24, seed=0)
    enc.model.save_pretrained(tmp_path / "t5")
    enc.tokenizer.save_pretrained(tmp_path / "t5")
    assert load_text_encoder(tmp_path / "t5").model.dtype == torch.float32  # the file's
    half = load_text_encoder(tmp_path / "t5", dtype=torch.float16)
    assert half.model.dtype == torch.float16
    tokens, _ = half.encode(["abc"])
    assert tokens.dtype == torch.float32 and torch.isfinite(tokens).all()
    model = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny", text_dim=24))
    model.save_pretrained(tmp_path / "m")
    pipe = stunet.Pipeline.from_pretrained(tmp_path / "m", text_encoder=tmp_path / "t5", device="cpu",
                                           dtype=torch.bfloat16, progress=False)
    assert pipe.text_encoder.model.dtype == pipe.base.dtype == torch.bfloat16


def test_encoders_sharing_a_rust_tokenizer_encode_from_threads_as_alone(tmp_path):
    """Two encoders with different padding over one Rust-backed tokenizer, called from eight threads at once:
    each call gives what it gives alone (the tokenizer's settings change from call to call)."""
    transformers = pytest.importorskip("transformers")
    from diffusers_models import clip

    slow, model = clip(tmp_path / "clip", max_length=16)
    slow.save_pretrained(tmp_path / "tokenizer")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert tokenizer.is_fast
    encoders = [HFTextEncoder(model, tokenizer, 16), HFTextEncoder(model, tokenizer, 16, pad_to_max_length=True,
                                                                    attend_padding=True)]
    prompts = ["a cat", "a teddy bear surfing on a wave", "x", "two dogs in the snow"]
    calls = [(e, p) for e in range(2) for p in range(4)] * 8
    alone = {(e, p): encoders[e].encode([prompts[p]]) for e in range(2) for p in range(4)}
    with ThreadPoolExecutor(8) as pool:
        shared = list(pool.map(lambda call: encoders[call[0]].encode([prompts[call[1]]]), calls))
    for call, (tokens, mask) in zip(calls, shared):
        assert torch.equal(tokens, alone[call][0]) and torch.equal(mask, alone[call][1]), call


def test_a_prompt_longer_than_the_encoder_reads_is_cut_with_a_warning(caplog):
    encoder = tiny_random_t5(24, seed=0)  # ByT5: a token per byte, 64 read (63 and the end-of-text token)
    long = "a teddy bear surfing a huge blue wave at sunset, seen from the beach"
    assert len(long) + 1 > 64
    with caplog.at_level(logging.WARNING, logger="stunet.pipeline.text"):
        tokens, mask = encoder.encode(["a cat", long])
        assert torch.equal(tokens[1], encoder.encode([long[:63]])[0][0])  # what the model reads: the first 63
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"stunet: the text encoder reads 64 tokens and the prompt {long[:37] + '...'!r} has "
                        f"{len(long) + 1}: its end {long[63:]!r} is left out"]
