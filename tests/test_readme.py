"""The README's code runs as written: every ```python block, and every `stunet` command of the ```bash blocks
(in order, in one scratch folder, as a new user would type them). The set-up block (pip, pytest) is what
.ci/run itself runs."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import stunet
from utils import left_in_temp, needs_av

README = Path(__file__).resolve().parent.parent / "README.md"


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_the_set_up_commands_and_the_main_job():
    first = _blocks("bash")[0].strip().splitlines()
    assert first == ['pip install torch==2.13.0 -e ".[test]"', "pytest -n auto --dist loadfile"]
    assert _blocks("bash")[1].strip().startswith("stunet generate ")
    ci = (README.parent / ".ci" / "run").read_text()
    assert all(line in ci for line in first)


@needs_av
def test_python_blocks_run_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for block in _blocks("python"):
        exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert (tmp_path / "out.mp4").is_file() and (tmp_path / "tiny_model" / "config.json").is_file()


@needs_av
@pytest.mark.slow
def test_stunet_commands_run_as_written(tmp_path, tmp_path_factory):
    """Each command succeeds, writes its output and tells only stunet's lines; together they leave nothing in
    the temporary folder (torch's compile cache, torchinductor_USER, aside)."""
    commands = [line.strip() for block in _blocks("bash") for line in block.splitlines()
                if line.strip().startswith("stunet ")]
    assert len(commands) >= 6
    temp = tmp_path_factory.mktemp("temp")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TMPDIR": str(temp)}
    # The README's Python section saves `tiny_model` before its export commands use it.
    stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).save_pretrained(tmp_path / "tiny_model")
    _public_checkpoint_stand_ins(tmp_path)
    for command in commands:
        argv = shlex.split(command)
        run = subprocess.run([sys.executable, "-m", "stunet.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                             text=True, timeout=600, env=env)
        assert run.returncode == 0, f"{command}\n{run.stderr[-2000:]}"
        output = argv[argv.index("-o") + 1]
        assert (tmp_path / output).exists(), command
        # what a user reads: stunet's lines, its progress bars and the stages of exports, builds and conversions;
        # no library's chatter
        foreign = [line for line in re.split(r"[\r\n]", run.stderr) if line.strip()
                   and not line.startswith(("stunet", "export ", "build ", "convert "))
                   and not re.search(r"\d+%\|", line)]
        assert not foreign, f"{command}\n" + "\n".join(foreign[:10])
    assert left_in_temp(temp) == []


def _public_checkpoint_stand_ins(folder: Path) -> None:
    """Tiny random diffusers folders under the names the README converts (their real weights are gigabytes
    that a user downloads themselves): ZeroScope pipelines, an SD 1.5 pipeline, an AnimateDiff motion adapter,
    with SD's 8-pixels-per-latent VAE so the README's frame sizes hold."""
    pytest.importorskip("diffusers")
    import diffusers_models as tiny

    fast = tiny.FAST
    zeroscope = tiny.text_to_video_pipeline(folder / ".parts", vae_levels=4, **fast)
    zeroscope.save_pretrained(folder / "zeroscope_v2_576w")
    zeroscope.save_pretrained(folder / "zeroscope_v2_XL")
    tiny.save_sd_folder(folder / "stable-diffusion-v1-5", vae_levels=4, **fast)
    tiny.motion_adapter(fast["widths"], fast["groups"]).save_pretrained(folder / "animatediff-motion-adapter-v1-5-2")
