"""One generation over the ranks of a ``torch.distributed`` process group (NCCL on GPUs, gloo on CPUs).

    torchrun --nproc-per-node 2 my_script.py          # or: stunet generate ... --nproc 2

    import stunet
    stunet.distributed.init()                          # the process group from torchrun's environment
    pipe = stunet.Pipeline(base, encoder, ssr)         # created after init: splits its work over the ranks
    out = pipe("a teddy bear surfing", seed=0)         # rank 0 gets out.frames; the others get None

What is split, and how:

- the base stage runs each model call's rows (one per clip, conditional and unconditional) as separate calls
  shared among the ranks: two ranks run classifier-free guidance's two halves, more ranks the clips of a batch;
- the SSR stage shares its MultiDiffusion window calls (``SSROptions.batch_size`` windows each) among the
  ranks.

After each step's calls, one all-gather gives every rank every output (preceded by a small exchange of their
shapes, which is also where a rank's error reaches all the others). Every rank then takes the same blend and
the same sampler step on the same inputs: noise is one draw from the seed on every rank, so sampler state,
noise and the runtime's step are identical everywhere. The calls are the same whatever the number of ranks
(a call is never split further because more ranks exist), so the video is bit for bit the same on 1, 2 or N
ranks (including more ranks than calls: the spare ranks wait). With ``parallel`` the calls are smaller than a
single-process pipeline's batched ones, which changes the last bits of the video (not its content).

A rank that raises makes every rank raise (``RankFailed``, naming the rank and its error) at the step's
exchange; a rank that dies without raising is caught by the process group's timeout (``init(timeout=...)``).
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from .config import check_size, is_choice, shown
from .progress import loggers_quiet

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class RankFailed(RuntimeError):
    """Another rank of the process group raised during a shared step."""


def init(backend: str | None = None, *, timeout: datetime.timedelta | float = DEFAULT_TIMEOUT) -> None:
    """Initialise the default process group from the environment torchrun sets (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT, LOCAL_RANK): NCCL when CUDA is available, else gloo. On CUDA, each rank takes
    device LOCAL_RANK. A no-op when a process group exists; the group it creates is destroyed at exit.
    ``timeout`` (seconds or a timedelta) bounds every collective, so a rank that dies cannot hang the others."""
    if backend not in (None, "nccl", "gloo"):
        raise ValueError(f"stunet.distributed.init: backend must be 'nccl', 'gloo' or None (NCCL when CUDA is "
                         f"available, else gloo), got {shown(backend)}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("stunet.distributed.init: backend='nccl' needs CUDA, which this machine lacks; use "
                         "backend='gloo' (or leave it None)")
    timeout = _positive_timeout(timeout)
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"stunet.distributed.init: {', '.join(missing)} not set; launch with torchrun "
                           "(torchrun --nproc-per-node N script.py) or `stunet generate ... --nproc N`")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timeout)
    atexit.register(shutdown)


def _positive_timeout(timeout) -> datetime.timedelta:
    seconds = (timeout.total_seconds() if isinstance(timeout, datetime.timedelta)
               else timeout if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) else None)
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"stunet.distributed.init: timeout must be a positive number of seconds or a "
                         f"datetime.timedelta, got {shown(timeout)}")
    return datetime.timedelta(seconds=seconds)


def shutdown() -> None:
    """Destroys the default process group (registered at exit by :func:`init`: a process group left to the
    interpreter's teardown can abort the process after its work is done)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def leave(code: int = 0) -> None:
    """Ends this rank's process with ``code``: destroys the process group, flushes the standard streams and exits
    without the interpreter's teardown, in which PyTorch's process-group threads can abort a rank whose work is
    done ("terminate called without an active exception"). The last call of a rank's script."""
    import sys

    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def device() -> torch.device:
    """This rank's device: cuda:LOCAL_RANK on a GPU node, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@dataclass
class Stats:
    """Where a rank's time went in the shared steps (seconds)."""

    compute: float = 0.0
    communication: float = 0.0
    steps: int = 0

    @property
    def communication_share(self) -> float:
        total = self.compute + self.communication
        return self.communication / total if total else 0.0


@dataclass
class Parallel:
    """The work split of a pipeline over a process group (the default one unless ``group`` is given).

    ``frames``: "rank0" (the default: only rank 0 decodes and returns frames; the others return
    ``frames=None``) or "all"."""

    group: object = None
    frames: str = "rank0"
    stats: dict[str, Stats] = field(default_factory=dict)
    """Time per stage ("base", "ssr"), accumulated over this object's life."""

    def __post_init__(self):
        if not is_choice(self.frames, ("rank0", "all")):
            raise ValueError(f"Parallel.frames must be 'rank0' or 'all', got {shown(self.frames)}")

    @property
    def active(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.active else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.active else 1

    @property
    def gets_frames(self) -> bool:
        return self.frames == "all" or self.rank == 0

    def owner(self, call: int) -> int:
        """The rank that runs call number ``call`` of a step (round robin)."""
        return call % self.world_size

    def agree(self, value):
        """Rank 0's ``value`` on every rank (e.g. a seed drawn at random)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                                   group=self.group)
        return box[0]

    def mapper(self, stage: str) -> Callable[[list[Callable[[], torch.Tensor]]], list[torch.Tensor]]:
        """``map`` with its time accounted to ``stage``."""
        return lambda calls: self.map(calls, stage)

    def map(self, calls: list[Callable[[], torch.Tensor]], stage: str = "") -> list[torch.Tensor]:
        """Runs each call on its owner rank and returns every call's output on every rank, in call order."""
        start = time.perf_counter()
        mine, error = {}, None
        try:
            for i, call in enumerate(calls):
                if self.owner(i) == self.rank:
                    mine[i] = call()
        except Exception as e:  # reported to every rank at the exchange below, then raised here too
            error = e
        computed = time.perf_counter()
        if self.world_size == 1:
            if error is not None:
                raise error
            self._account(stage, start, computed)
            return [mine[i] for i in range(len(calls))]

        meta = (None if error is None else f"{type(error).__name__}: {error}",
                {i: (tuple(t.shape), t.dtype) for i, t in mine.items()})
        metas = [None] * self.world_size
        dist.all_gather_object(metas, meta, group=self.group)
        failed = [(r, m[0]) for r, m in enumerate(metas) if m[0] is not None]
        if failed:
            if error is not None:
                raise error
            raise RankFailed("; ".join(f"rank {r} failed: {msg}" for r, msg in failed))

        outputs = self._all_gather(mine, metas)
        self._account(stage, start, computed)
        return [outputs[i] for i in range(len(calls))]

    def _all_gather(self, mine: dict[int, torch.Tensor], metas: list) -> dict[int, torch.Tensor]:
        """Every rank's outputs, as one all-gather of byte buffers padded to the largest rank's."""
        device = next(iter(mine.values())).device if mine else None
        on_device = dist.get_backend(self.group) == "nccl"
        sizes = [sum(_nbytes(shape, dtype) for shape, dtype in m[1].values()) for m in metas]
        width = max(sizes)
        if device is None or not on_device:
            device = torch.device("cpu") if not on_device else torch.device("cuda", torch.cuda.current_device())
        payload = torch.zeros(width, dtype=torch.uint8, device=device)
        offset = 0
        for i in sorted(mine):
            raw = mine[i].contiguous().view(-1).view(torch.uint8).to(device)
            payload[offset:offset + raw.numel()] = raw
            offset += raw.numel()
        gathered = [torch.empty_like(payload) for _ in range(self.world_size)]
        dist.all_gather(gathered, payload, group=self.group)
        outputs = dict(mine)
        target = next(iter(mine.values())).device if mine else None
        for r, (_, shapes) in enumerate(metas):
            offset = 0
            for i in sorted(shapes):
                shape, dtype = shapes[i]
                n = _nbytes(shape, dtype)
                if r != self.rank:
                    t = gathered[r][offset:offset + n].view(dtype).view(shape)
                    outputs[i] = t.to(target) if target is not None else t.clone()
                offset += n
        return outputs

    def _account(self, stage: str, start: float, computed: float) -> None:
        stats = self.stats.setdefault(stage, Stats())
        stats.compute += computed - start
        stats.communication += time.perf_counter() - computed
        stats.steps += 1


def _nbytes(shape, dtype: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * torch.empty((), dtype=dtype).element_size()


def resolve(parallel) -> Parallel | None:
    """What a Pipeline's ``parallel=`` means: None (split over the default process group when one with more
    than one rank exists), "auto" (initialise it from torchrun's environment when there is one), False (never
    split), or a :class:`Parallel`."""
    if parallel is False:
        return None
    if isinstance(parallel, Parallel):
        return parallel
    if parallel is None:
        return Parallel() if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None
    if parallel == "auto":
        if not dist.is_initialized() and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
            init()
        return Parallel()
    raise ValueError(f"parallel must be None, 'auto', False or a stunet.distributed.Parallel, got {shown(parallel)}")


def local_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


REFUSALS = "STUNET_LAUNCH_REFUSALS"
"""The environment variable naming the folder where a launched rank leaves the argument error it refuses its
command line with (``rank<N>.txt``), for the launcher to report once (``launch``)."""


class ArgumentsRefused(ValueError):
    """The ranks of a ``launch`` refused its command line; the message is the first rank's argument error."""


@contextlib.contextmanager
def _agent_quiet():
    """torchrun's agent logs what :func:`launch` reports itself (the signal it received, the ranks it stops, a
    rank's exit status): its loggers show only critical records while it runs. Its exceptions still propagate."""
    names = [name for name, logger in logging.root.manager.loggerDict.items()
             if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger)]
    with loggers_quiet(logging.CRITICAL, *names):
        yield


RANK_MAIN = """\
import os, signal
try:
    from stunet.cli import run
except KeyboardInterrupt:  # Ctrl-C while the rank starts: the launcher reports it, once
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(130)
run()
"""
"""The program of a launched rank (``python -c RANK_MAIN ARGV``): the ``stunet`` program, ended by SIGINT without
a traceback when Ctrl-C lands while it is still importing (``stunet.cli.main`` handles the interrupts after)."""


def launch(nproc: int, argv: list[str]) -> int:
    """Runs the ``stunet`` program (:data:`RANK_MAIN`) with ARGV on ``nproc`` local ranks through torchrun; its
    exit status.

    An argument error that the ranks find (the pipeline checks its call on every rank) raises ArgumentsRefused
    here with the lowest rank's message, whichever rank stopped first. A SIGINT to the launcher (a terminal's
    Ctrl-C reaches the ranks too) stops the ranks and raises KeyboardInterrupt here; SIGTERM, SIGHUP or SIGQUIT
    stop them and return 128 + the signal's number. Without OMP_NUM_THREADS, each rank gets its share of this
    process's cores (torchrun would give it one thread)."""
    import signal
    import sys
    import tempfile
    from pathlib import Path

    check_size("nproc", nproc, 1)
    if not isinstance(argv, (list, tuple)) or not all(isinstance(a, str) for a in argv):
        raise TypeError(f"stunet.distributed.launch: argv must be a list of strings (the stunet command line), "
                        f"got {shown(argv)}")

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    threads = {} if "OMP_NUM_THREADS" in os.environ else {"OMP_NUM_THREADS": str(max(1, local_cores() // nproc))}
    with tempfile.TemporaryDirectory(prefix="stunet-launch-") as scratch, _agent_quiet():
        refusals = Path(scratch, "refusals")
        refusals.mkdir()
        # torchrun's agent keeps each rank's error file under its log folder: here, not a new temporary folder
        # it would leave behind
        args = torchrun.parse_args(["--nproc-per-node", str(nproc), "--standalone", "--log-dir",
                                    str(Path(scratch, "torchrun")), "--no-python", sys.executable, "-c", RANK_MAIN,
                                    *argv])
        os.environ.update({REFUSALS: str(refusals), **threads})  # the ranks inherit them
        try:
            torchrun.run(args)
        except ChildFailedError as e:
            refused = sorted(refusals.glob("rank*.txt"), key=lambda p: int(p.stem[4:]))
            if refused:
                raise ArgumentsRefused(refused[0].read_text()) from None
            failures = ", ".join(f"rank {r} exit {f.exitcode}" for r, f in sorted(e.failures.items()))
            print(f"stunet: {failures}", file=sys.stderr)  # each rank has printed its own error
            return max(1, *(f.exitcode for f in e.failures.values() if f.exitcode > 0))
        except SignalException as e:  # torchrun's agent has stopped the ranks
            if e.sigval == signal.SIGINT:
                raise KeyboardInterrupt from None
            print(f"stunet: stopped by {signal.Signals(e.sigval).name}", file=sys.stderr)
            return 128 + int(e.sigval)
        finally:
            for name in (REFUSALS, *threads):
                del os.environ[name]
    return 0


__all__ = ["Parallel", "Stats", "RankFailed", "ArgumentsRefused", "init", "shutdown", "leave", "device", "resolve",
           "launch"]
