"""Generation shared among ranks (stunet.distributed) on CPU processes with gloo, spawned by the tests through
torchrun and bounded in time: the frames equal the single-process ones bit for bit for 1, 2 and 3 ranks (calls
that do not divide evenly among the ranks, more ranks than windows); a failing or dying rank ends every rank
with the error instead of a hang; the CLI's --nproc."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from utils import left_in_temp, needs_av

import stunet
from stunet.distributed import Parallel, RankFailed, resolve

HERE = Path(__file__).resolve().parent


def _torchrun(nproc: int, folder: Path, mode: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """tests/dist_worker.py in MODE on NPROC ranks, writing to FOLDER (torchrun's logs too)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT", "TRITON_INTERPRET")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "--log-dir", str(folder / "torchrun"), str(HERE / "dist_worker.py"),
                           str(folder), mode], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The worker's cascade (2 prompts with guidance: 4 base calls a step; 2 SSR windows, one per call) on 1,
    2 and 3 ranks."""
    out = {}
    for n in (1, 2, 3):
        folder = tmp_path_factory.mktemp(f"world{n}")
        run = _torchrun(n, folder, "ok")
        assert run.returncode == 0, run.stderr[-3000:]
        out[n] = [torch.load(folder / f"rank{r}.pt") for r in range(n)]
    return out


def test_frames_do_not_depend_on_the_number_of_ranks(runs):
    single = runs[1][0]
    assert single["world"] == 1 and single["frames"].shape == (2, 8, 16, 16, 3)
    for n in (2, 3):
        ranks = runs[n]
        assert all(r["world"] == n for r in ranks)
        assert torch.equal(ranks[0]["frames"], single["frames"]), f"{n} ranks"
        assert torch.equal(ranks[0]["low"], single["low"]), f"{n} ranks: the base stage"
        assert all(r["frames"] is None for r in ranks[1:])  # rank 0 gets the frames
        assert all(r["steps"] == {"base": 2, "ssr": 2} for r in ranks)  # one exchange per step
        assert all(0 <= r["share"] < 1 for r in ranks)


def test_a_rank_that_raises_ends_every_rank_with_its_error(tmp_path):
    run = _torchrun(2, tmp_path, "raise", timeout=180)
    assert run.returncode != 0
    assert "RankFailed: rank 1 failed: RuntimeError: injected failure" in run.stderr  # rank 0's error
    assert "RuntimeError: injected failure" in run.stderr  # rank 1's own
    assert not list(tmp_path.glob("rank*.pt"))


def test_a_rank_that_dies_does_not_hang_the_others(tmp_path):
    run = _torchrun(2, tmp_path, "die", timeout=180)
    assert run.returncode != 0
    assert not list(tmp_path.glob("rank*.pt"))


@needs_av
def test_cli_nproc_launches_the_ranks(tmp_path, tmp_path_factory):
    """Both runs write the same video, and the launch leaves nothing in the temporary folder (torchrun's agent
    would leave a torchelastic_* tree of its own)."""
    temp = tmp_path_factory.mktemp("temp")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(temp))
    common = ["generate", "a cat", "--preset", "tiny", "--steps", "2", "--frames", "8", "--height", "16",
              "--width", "16", "-q"]
    for name, nproc in (("two.mp4", "2"), ("one.mp4", "1")):
        run = subprocess.run([sys.executable, "-m", "stunet.cli", *common, "-o", name, "--nproc", nproc],
                             cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stderr.count("stunet: wrote") == 1 and run.stderr.count("RANDOM weights") == 1, run.stderr
        assert all(line.startswith("stunet: ") for line in run.stderr.splitlines()), run.stderr
    assert (tmp_path / "two.mp4").read_bytes() == (tmp_path / "one.mp4").read_bytes(), "2 ranks and 1 differ"
    assert left_in_temp(temp) == []


def test_cli_nproc_says_a_warning_once(tmp_path, tmp_path_factory):
    """The ranks make the same calls and meet the same warnings: rank 0 says them, once."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(tmp_path_factory.mktemp("temp")))
    run = subprocess.run([sys.executable, "-m", "stunet.cli", "generate", "", "--preset", "tiny", "--steps", "1",
                          "--frames", "8", "-q", "-o", "o.npy", "--nproc", "2"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("stunet: an empty prompt: that video is generated unconditionally") == 1, run.stderr


def test_cli_nproc_a_bad_argument_that_the_ranks_find_is_told_once_by_the_launcher(tmp_path, tmp_path_factory):
    temp = tmp_path_factory.mktemp("temp")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(temp))
    run = subprocess.run([sys.executable, "-m", "stunet.cli", "generate", "a cat", "--preset", "tiny", "--steps",
                          "2000", "--frames", "8", "-q", "-o", "o.mp4", "--nproc", "2"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 2
    assert run.stderr.count("error: num_inference_steps must be") == 0, run.stderr  # not from a rank
    assert run.stderr.count("stunet generate: error: argument --steps: num_inference_steps must be") == 1, run.stderr
    assert run.stderr.count("usage: stunet generate") == 1 and list(tmp_path.iterdir()) == []
    assert "torch/distributed/elastic" not in run.stderr, run.stderr  # torchrun's agent reports nothing itself
    assert left_in_temp(temp) == []


@pytest.mark.parametrize("refusing", [[1], [0, 1], [2, 10]])
def test_launch_reports_the_lowest_refusing_rank_whichever_stopped_first(monkeypatch, refusing):
    """torchrun stops the other ranks when one exits: the first to refuse may be any rank, and the others may
    be stopped before they refuse; the launcher reports the lowest rank's refusal that it finds."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    import stunet.distributed as distributed

    def ranks(args):
        for rank in refusing:
            (Path(os.environ[distributed.REFUSALS]) / f"rank{rank}.txt").write_text(f"argument --steps: rank {rank}")
        raise ChildFailedError("stunet.cli", {r: ProcessFailure(r, 1000 + r, 2, "") for r in refusing})

    monkeypatch.setattr(torchrun, "run", ranks)
    with pytest.raises(distributed.ArgumentsRefused, match=f"^argument --steps: rank {refusing[0]}$"):
        distributed.launch(2, ["generate", "x"])
    assert distributed.REFUSALS not in os.environ


@pytest.mark.parametrize("given", [None, "3"])
def test_launch_gives_each_rank_its_share_of_the_cores_unless_told(monkeypatch, given):
    from torch.distributed import run as torchrun

    import stunet.distributed as distributed

    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    seen = []
    monkeypatch.setattr(torchrun, "run", lambda args: seen.append(os.environ["OMP_NUM_THREADS"]))
    assert distributed.launch(2, ["generate", "x"]) == 0
    assert seen == [given or str(max(1, distributed.local_cores() // 2))]
    assert os.environ.get("OMP_NUM_THREADS") == given and distributed.REFUSALS not in os.environ


@pytest.mark.parametrize("nproc, argv, error", [
    (0, ["generate", "x"], ValueError), (-1, ["generate", "x"], ValueError), (True, ["generate", "x"], ValueError),
    ("2", ["generate", "x"], ValueError), (2, "generate x", TypeError), (2, ["--steps", 4], TypeError),
])
def test_launch_refuses_a_bad_rank_count_or_command_line(nproc, argv, error):
    with pytest.raises(error, match="nproc must be a positive integer" if error is ValueError
                       else "argv must be a list of strings"):
        stunet.distributed.launch(nproc, argv)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_cli_nproc_stops_the_ranks_in_one_line(tmp_path, tmp_path_factory, sig):
    """A terminal's Ctrl-C (SIGINT to the whole group) ends `--nproc` as it ends one process: one line, the
    launcher ended by SIGINT; SIGTERM to the launcher stops the ranks and exits 143. Nothing else: no traceback
    and no narration from torchrun's agent, no file, no temporary folder."""
    temp = tmp_path_factory.mktemp("temp")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", TMPDIR=str(temp))
    launcher = subprocess.Popen([sys.executable, "-m", "stunet.cli", "generate", "a cat", "--preset", "tiny",
                                 "--steps", "1000", "--frames", "64", "-q", "-o", "o.mp4", "--nproc", "2"],
                                cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while "RANDOM weights" not in (line := launcher.stderr.readline()):  # rank 0 has built its pipeline
            assert line, "the launcher ended before its ranks started"
        time.sleep(2)
        if sig == signal.SIGINT:
            os.killpg(launcher.pid, sig)
        else:
            launcher.send_signal(sig)
        rest = launcher.stderr.read()
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and its ranks
    if sig == signal.SIGINT:
        assert (code, rest.splitlines()) == (-signal.SIGINT, ["stunet: interrupted"]), rest
    else:
        assert (code, rest.splitlines()) == (143, ["stunet: stopped by SIGTERM"]), rest
    assert list(tmp_path.iterdir()) == [] and left_in_temp(temp) == []


def test_a_rank_interrupted_while_it_imports_ends_by_sigint_without_a_traceback(tmp_path):
    """Ctrl-C reaches the ranks too, and may land while a rank still imports torch: the rank's program ends by
    SIGINT in silence (the launcher prints the one line), and otherwise it is the `stunet` program."""
    from stunet.distributed import RANK_MAIN

    fake = tmp_path / "stunet"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "cli.py").write_text("raise KeyboardInterrupt  # as a Ctrl-C during the import would\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    interrupted = subprocess.run([sys.executable, "-c", RANK_MAIN, "generate", "x"], capture_output=True,
                                 text=True, env=env, timeout=60)
    assert (interrupted.returncode, interrupted.stderr) == (-signal.SIGINT, "")
    program = subprocess.run([sys.executable, "-c", RANK_MAIN, "--version"], capture_output=True, text=True,
                             timeout=120)
    assert (program.returncode, program.stdout.strip()) == (0, f"stunet {stunet.__version__}"), program.stderr


def test_parallel_in_one_process_runs_every_call_here():
    p = Parallel()
    assert (p.rank, p.world_size, p.gets_frames) == (0, 1, True)
    assert [t.item() for t in p.map([lambda i=i: torch.tensor(i) for i in range(5)])] == list(range(5))
    assert p.stats[""].steps == 1
    with pytest.raises(ZeroDivisionError):
        p.map([lambda: torch.tensor(1), lambda: 1 / 0])
    with pytest.raises(ValueError, match="Parallel.frames must be 'rank0' or 'all'"):
        Parallel(frames="rank1")
    with pytest.raises(ValueError, match="parallel must be None, 'auto', False"):
        resolve("yes")
    assert resolve(None) is None and resolve(False) is None and resolve("auto").world_size == 1
    assert issubclass(RankFailed, RuntimeError)


def test_init_without_a_launcher_says_how(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="launch with torchrun"):
        stunet.distributed.init()


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="mpi"), "backend must be 'nccl', 'gloo' or None"),
    (dict(timeout=0), "timeout must be a positive number of seconds"),
    (dict(timeout=-1.5), "timeout must be a positive number of seconds"),
    (dict(timeout=float("nan")), "timeout must be a positive number of seconds"),
    (dict(timeout="600"), "timeout must be a positive number of seconds"),
])
def test_init_refuses_a_bad_backend_or_timeout_before_it_connects(monkeypatch, kwargs, message):
    monkeypatch.setenv("RANK", "0")  # a launcher's environment: the refusal comes before any connection
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=message):
        stunet.distributed.init(**kwargs)
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_init_refuses_nccl_without_cuda():
    with pytest.raises(ValueError, match="backend='nccl' needs CUDA"):
        stunet.distributed.init("nccl")


def test_split_calls_change_only_the_last_bits():
    """parallel="auto" in one process makes one call per row (as on any number of ranks) instead of one
    batched call: the same video up to float rounding."""
    torch.manual_seed(0)
    base = stunet.STUNet(stunet.STUNetConfig.from_preset("tiny")).eval()
    encoder = stunet.text.tiny_random_t5(base.config.text_dim, seed=0)
    call = dict(num_frames=8, height=16, width=16, num_inference_steps=2, guidance_scale=3.0, seed=1,
                output_type="pt")
    split = stunet.Pipeline(base, encoder, progress=False, parallel="auto")
    batched = stunet.Pipeline(base, encoder, progress=False)
    assert "shared among 1 rank(s)" in split.describe() and "rank" not in batched.describe()
    a, b = split(["a cat", "a dog"], **call).frames, batched(["a cat", "a dog"], **call).frames
    assert (a.float() - b.float()).abs().max() < 1e-4
