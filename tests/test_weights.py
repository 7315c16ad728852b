"""Weights on disk (config.json + model.safetensors), strict loading, atomic saves, stylization."""
from __future__ import annotations

import os
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from utils import current_umask, make_inputs, randomize_temporal

import stunet
from stunet import WeightsError, interpolate_spatial


@pytest.fixture
def trained(tiny_model):
    return randomize_temporal(tiny_model)


def test_round_trip_is_bit_exact(trained, tiny_config, tmp_path):
    trained.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    loaded = stunet.STUNet.from_pretrained(tmp_path / "m")
    assert loaded.config == tiny_config and not loaded.training
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x, t, text = make_inputs(tiny_config)
    with torch.no_grad():
        assert torch.equal(trained(x, t, text), loaded(x, t, text))


def test_weights_file_is_safetensors_not_pickle(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + header_len])
    assert header["__metadata__"]["format"] == "stunet"
    assert not raw.startswith(b"\x80") and b"PK\x03\x04" not in raw[:4]  # neither pickle nor a torch zip


def test_from_pretrained_casts(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    half = stunet.STUNet.from_pretrained(tmp_path, dtype=torch.float16)
    assert half.dtype == torch.float16 and half.device.type == "cpu"


@pytest.mark.parametrize("device,dtype,error,message", [
    ("gpu", None, ValueError, "device must be a device such as 'cpu', 'cuda' or 'cuda:1', got 'gpu'"),
    ("cuda", None, ValueError, "device='cuda' but torch sees no CUDA device .*; use device='cpu'"),
    ("cpu", "float16", TypeError, "dtype must be a floating-point torch.dtype such as torch.float16, got 'float16'"),
    (None, torch.int8, TypeError, "dtype must be a floating-point torch.dtype"),
])
def test_every_loader_checks_where_it_puts_the_model_before_reading(device, dtype, error, message, tmp_path,
                                                                   monkeypatch):
    """Named by argument, before any file is read: the folders here do not even exist."""
    from stunet.pipeline.latent import load_vae
    from stunet.pipeline.text import WordEncoder, load_text_encoder

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")  # a CUDA build of torch on a machine without a GPU
    missing = tmp_path / "missing"
    loaders = [lambda: stunet.STUNet.from_pretrained(missing, device=device, dtype=dtype),
               lambda: stunet.Pipeline.from_pretrained(missing, device=device, dtype=dtype),
               lambda: load_vae(missing, device=device, dtype=dtype),
               lambda: load_text_encoder(missing, device=device, dtype=dtype),
               lambda: stunet.demo.pipeline(device=device, dtype=dtype)]
    if dtype is None:  # a WordEncoder keeps its own dtype
        loaders.append(lambda: WordEncoder.load(missing, device))
    for load in loaders:
        with pytest.raises(error, match=message):
            load()


def test_mismatched_weights_list_every_problem_at_once(trained, tmp_path):
    trained.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["out.conv.weight"], state["time_embed.0.bias"]
    state["extra.weight"] = torch.zeros(3)
    state["mid.0.conv1.weight"] = torch.zeros(1, 2, 3, 3)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsError) as info:
        stunet.STUNet.from_pretrained(tmp_path)
    msg = str(info.value)
    assert "2 missing keys" in msg and "out.conv.weight" in msg and "time_embed.0.bias" in msg
    assert "1 unexpected keys" in msg and "extra.weight" in msg
    assert "1 shape mismatches" in msg and "mid.0.conv1.weight: expected (32, 32, 3, 3), got (1, 2, 3, 3)" in msg


def test_the_weights_of_another_model_are_counted_and_the_first_of_each_kind_listed(trained):
    """A file of another model misses every key: the message counts them and lists the first 20 (it listed all,
    thousands of lines for a full-size model)."""
    from stunet.model.weights import check_state_dict

    expected = trained.state_dict()
    given = {f"other.{i}": torch.zeros(1) for i in range(25)}
    with pytest.raises(WeightsError) as info:
        check_state_dict(expected, given)
    lines = str(info.value).splitlines()
    first = sorted(expected)[:20]
    assert lines[1:23] == [f"  {len(expected)} missing keys:", *(f"    {k}" for k in first),
                           f"    ... and {len(expected) - 20} more"]
    assert lines[23:] == ["  25 unexpected keys:", *(f"    other.{i}" for i in sorted(range(25), key=str)[:20]),
                          "    ... and 5 more"]


def test_weights_of_another_config_are_refused(trained, tiny_config, tmp_path):
    trained.save_pretrained(tmp_path)
    tiny_config.replace(text_dim=16).save(tmp_path)
    with pytest.raises(WeightsError, match="shape mismatches"):
        stunet.STUNet.from_pretrained(tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_raises_a_clear_error(trained, tmp_path, damage):
    trained.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    path.write_bytes({"truncate": raw[: len(raw) // 2], "garbage": b"not a safetensors file" * 10,
                      "empty": b""}[damage])
    with pytest.raises(WeightsError, match=r"cannot read weights file .*model.safetensors.*truncated or not a "
                                           r"safetensors file"):
        stunet.STUNet.from_pretrained(tmp_path)


def test_missing_files_are_named(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory holding config.json"):
        stunet.STUNet.from_pretrained(tmp_path / "nope")
    trained.config.save(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights file"):
        stunet.STUNet.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config file"):
        stunet.STUNet.from_pretrained(tmp_path)


def test_failed_save_leaves_the_previous_weights_intact(trained, tmp_path, monkeypatch):
    trained.save_pretrained(tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def broken_save(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trained.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(trained, tmp_path, umask):
    """Atomic writes go through a private temporary file; the result has the mode a new file would get."""
    previous = os.umask(umask)
    try:
        trained.save_pretrained(tmp_path / "m")
    finally:
        os.umask(previous)
    for name in ("config.json", "model.safetensors"):
        assert (tmp_path / "m" / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_save_pretrained_names_what_is_in_the_way(trained, tmp_path, monkeypatch):
    """A file where the folder or one of its parents should be, or an empty path (the current directory), is
    refused by name before anything is written (an errno message before; "" wrote into the current directory)."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.chdir(tmp_path)  # where "" would have written
    for directory, error, message in [(tmp_path / "a_file", NotADirectoryError, ".*a_file' exists and is not a "),
                                      (tmp_path / "a_file" / "sub" / "m", NotADirectoryError,
                                       "cannot make .*: '.*a_file' is a file, not a directory"),
                                      ("", ValueError, "give a folder path, got ''")]:
        with pytest.raises(error, match="save_pretrained: " + message):
            trained.save_pretrained(directory)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_resaving_keeps_the_files_mode(trained, tmp_path):
    trained.save_pretrained(tmp_path / "m")
    os.chmod(tmp_path / "m" / "config.json", 0o640)
    trained.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").stat().st_mode & 0o777 == 0o640


def test_files_written_together_replace_their_paths_in_order_or_not_at_all(tmp_path):
    """``atomic_files``: a writer makes a group of files (an ONNX file and the weights it names) under their own
    names; they replace their paths in the order given, with a new file's mode or the replaced one's."""
    from stunet.io import atomic_files

    data, model = tmp_path / "m.onnx.data", tmp_path / "m.onnx"
    model.write_text("old")
    os.chmod(model, 0o640)
    with atomic_files(data, model) as folder:
        assert folder.parent == tmp_path and not data.exists()
        (folder / data.name).write_text("weights")
        (folder / model.name).write_text("graph")
    assert (data.read_text(), model.read_text()) == ("weights", "graph")
    assert (model.stat().st_mode & 0o777, data.stat().st_mode & 0o777) == (0o640, 0o666 & ~current_umask())
    with pytest.raises(OSError, match="disk full"):
        with atomic_files(data, model) as folder:
            (folder / data.name).write_text("partial")
            raise OSError("disk full")
    assert (data.read_text(), model.read_text()) == ("weights", "graph")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no temporary folder
    with pytest.raises(ValueError, match="not in one folder"):
        with atomic_files(tmp_path / "a", tmp_path / "sub" / "b"):
            pass
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with atomic_files(tmp_path / "sub" / "a", tmp_path / "sub" / "b"):
            pass
    with pytest.raises(IsADirectoryError, match="it is a directory"):
        with atomic_files(tmp_path):
            pass


def test_a_folder_built_aside_replaces_a_folder_a_file_or_where_a_link_points(tmp_path):
    """``atomic_dir``: the folder replaces a folder or a file at its path once it is complete, and lands where a
    symbolic link points, the link staying (rmtree refused the link, and a file, after the whole build); a
    failed build leaves what was there."""
    from stunet.io import atomic_dir

    def build(path, fail=False):
        with atomic_dir(path) as folder:
            (folder / "new").write_text("new")
            if fail:
                raise RuntimeError("the build failed")

    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "old").write_text("old")
    (tmp_path / "file").write_text("old")
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "old").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "target")
    for name in ("folder", "file", "link"):
        with pytest.raises(RuntimeError, match="the build failed"):
            build(tmp_path / name, fail=True)
    assert (tmp_path / "folder" / "old").exists() and (tmp_path / "file").read_text() == "old"
    assert (tmp_path / "link" / "old").exists()
    for name in ("folder", "file", "link"):
        build(tmp_path / name)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["new"], name
    assert (tmp_path / "link").is_symlink() and (tmp_path / "target" / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder", "link", "target"]  # no staging left
    (tmp_path / "plain").write_text("")
    with pytest.raises(NotADirectoryError, match="plain' is a file, not a directory"):  # before any build
        build(tmp_path / "plain" / "sub" / "folder")


def test_a_bad_config_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model_channels": 0}')
    with pytest.raises(ValueError, match=r"config.json': STUNetConfig.model_channels must be a positive integer"):
        stunet.STUNetConfig.load(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json': STUNetConfig.from_json: not valid JSON"):
        stunet.STUNetConfig.load(tmp_path)


def test_save_into_a_file_path_is_refused(trained, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        trained.save_pretrained(tmp_path / "f")


# -- stylization --------------------------------------------------------------------------------------------------
@pytest.fixture
def style(tiny_config):
    torch.manual_seed(99)
    return randomize_temporal(stunet.STUNet(tiny_config), seed=7)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.8, 1.0])
def test_interpolate_spatial_blends_only_spatial_weights(trained, style, alpha):
    result = interpolate_spatial(trained, style, alpha)
    orig, sty, new = trained.state_dict(), style.state_dict(), result.state_dict()
    temporal = [k for k in orig if trained.is_temporal_key(k)]
    spatial = [k for k in orig if not trained.is_temporal_key(k)]
    assert temporal and spatial
    for k in temporal:  # bit for bit the original's, never the style's
        assert torch.equal(new[k], orig[k]), k
    for k in spatial:
        torch.testing.assert_close(new[k], orig[k] + alpha * (sty[k] - orig[k]), rtol=0, atol=1e-6)
    assert result is not trained and torch.equal(trained.state_dict()["out.conv.weight"], orig["out.conv.weight"])


def test_interpolate_spatial_takes_a_text_to_image_state_dict(trained, style):
    spatial_only = {k: v for k, v in style.state_dict().items() if not style.is_temporal_key(k)}
    a = interpolate_spatial(trained, spatial_only, 0.7).state_dict()
    b = interpolate_spatial(trained, style, 0.7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_interpolate_spatial_errors(trained, style):
    with pytest.raises(ValueError, match=r"alpha must be a number in \[0, 1\]"):
        interpolate_spatial(trained, style, 1.5)
    with pytest.raises(TypeError, match="orig must be a STUNet"):
        interpolate_spatial(style.state_dict(), style, 0.5)
    partial = {k: v for k, v in style.state_dict().items() if k != "out.conv.weight"}
    with pytest.raises(WeightsError, match="missing keys:\n    out.conv.weight"):
        interpolate_spatial(trained, partial, 0.5)
    with pytest.raises(TypeError, match="style must be a STUNet or a state dict, got str"):
        interpolate_spatial(trained, "style.safetensors", 0.5)
    as_arrays = {k: v.numpy() for k, v in style.state_dict().items()}
    with pytest.raises(TypeError, match=r"must be floating-point torch tensors; \S+ is of type ndarray \(\d+ more\)"):
        interpolate_spatial(trained, as_arrays, 0.5)
    as_ints = {**style.state_dict(), "out.conv.weight": style.out.conv.weight.detach().to(torch.int32)}
    with pytest.raises(TypeError, match=r"out.conv.weight is a torch.int32 tensor$"):
        interpolate_spatial(trained, as_ints, 0.5)
