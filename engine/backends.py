"""Backends: executors of the same STUNet (``backend(x, timesteps, text, mask, noise_level=None)``).

- ``reference``: eager PyTorch in the model's dtype; the source of truth.
- ``compile``: ``torch.compile(mode="max-autotune")`` of the reference: the peer a user could build.
- ``fast``: the same module tree with the Triton kernels of ``stunet.kernels`` swapped in (GroupNorm+SiLU,
  temporal attention, TemporalUp), a channels-last trunk, FP16 weights on CUDA, cross-attention keys and values
  computed once per text (a generation's steps reuse them), and on CUDA each input shape's forward captured
  once as a CUDA graph and replayed (static buffers; inputs are copied in, the output is copied out).

Data flows one way: pipeline -> sampler/runtime -> backend -> model.
"""
from __future__ import annotations

import abc
import contextlib
import logging
from dataclasses import dataclass

import torch

from .model import STUNet
from .model.unet import TextKVCache
from .model.validate import _as_batch_vector, check_forward_inputs

log = logging.getLogger(__name__)

BACKENDS = ("reference", "fast", "compile")


class Backend(abc.ABC):
    name = "abstract"

    def __init__(self, model: STUNet):
        if not isinstance(model, STUNet):
            raise TypeError(f"model must be a STUNet, got {type(model).__name__}")
        self.model = model

    @property
    def config(self):
        return self.model.config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config.in_channels}-channel STUNet, {self.model.dtype})"

    @abc.abstractmethod
    def __call__(self, x: torch.Tensor, timesteps, text: torch.Tensor, text_mask: torch.Tensor | None = None,
                 *, noise_level=None) -> torch.Tensor:
        """The model's prediction (B, out_channels, T, H, W)."""


class ReferenceBackend(Backend):
    name = "reference"

    def __call__(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        return self.model(x, timesteps, text, text_mask, noise_level=noise_level)


class CompileBackend(Backend):
    """torch.compile of the reference's ``forward_checked`` (once per input shape, ``dynamic=False``); inputs
    are validated eagerly first, and timesteps enter as tensors, so a new timestep never recompiles."""

    name = "compile"

    def __init__(self, model: STUNet, mode: str | None = "max-autotune", compiler="inductor"):
        super().__init__(model)
        self.mode = mode
        self._compiled = torch.compile(model.forward_checked, mode=mode, backend=compiler, dynamic=False)

    def __call__(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        args = check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)
        return self._compiled(*args)


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor | None
    noise_level: torch.Tensor | None
    out: torch.Tensor
    kv: TextKVCache  # this graph's own text keys/values: the graph reads these buffers
    source_text: torch.Tensor | None = None  # the caller's text and mask last copied in (identity, version)
    source_version: int = -1
    source_mask: torch.Tensor | None = None


class FastBackend(Backend):
    """Kernels, channels-last, cached text keys/values, and CUDA graphs on CUDA (``graphs=False`` to disable).

    ``max_batch``: run larger batches (a CFG pair, batched SSR windows) as sequential slices of at most this
    many clips. Activation memory (skips and working set) scales with the batch, weights do not: a CFG step of
    lumiere-base in halves holds about half the activations, at a small cost in speed.
    """

    name = "fast"

    def __init__(self, model: STUNet, *, graphs: bool | None = None, max_batch: int | None = None):
        super().__init__(model)
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.max_batch = max_batch
        device = model.device
        if device.type == "cuda" and model.dtype != torch.float16:
            log.info("stunet fast backend: converting the model's weights from %s to float16", model.dtype)
            model.half()
        model.to(memory_format=torch.channels_last)  # conv weights in the trunk's layout
        # Eager calls' text K/V, one cache per batch slice so that slices do not evict each other.
        self._caches: dict[tuple[int, int], TextKVCache] = {}
        self._slices: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}
        self.graphs = device.type == "cuda" if graphs is None else bool(graphs)
        if self.graphs and device.type != "cuda":
            raise ValueError("graphs=True needs the model on a CUDA device")
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    @contextlib.contextmanager
    def _fast_mode(self, cache: TextKVCache):
        m = self.model
        saved = (m.channels_last, m.text_kv_cache)
        m.channels_last, m.text_kv_cache = True, cache
        try:
            with m.using_kernels():
                yield m
        finally:
            m.channels_last, m.text_kv_cache = saved

    def __call__(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        B = x.shape[0]
        if self.max_batch is None or B <= self.max_batch:
            return self._run((0, B), x, timesteps, text, text_mask, noise_level)
        parts = []
        for i in range(0, B, self.max_batch):
            rows = slice(i, min(i + self.max_batch, B))
            parts.append(self._run((rows.start, rows.stop), x[rows], _rows(timesteps, rows, B),
                                   self._slice("text", text, rows),
                                   None if text_mask is None else self._slice("mask", text_mask, rows),
                                   _rows(noise_level, rows, B)))
        return torch.cat(parts)

    def _slice(self, what: str, t: torch.Tensor, rows: slice) -> torch.Tensor:
        """The same slice object for the same (unchanged) text at every call: the text K/V cache keys on
        tensor identity. One entry per slice position, replaced when the text changes."""
        key = (what, rows.start, rows.stop)
        cached = self._slices.get(key)
        if cached is None or cached[0] is not t or cached[1] != t._version:
            cached = self._slices[key] = (t, t._version, t[rows])
        return cached[2]

    def _run(self, slot: tuple[int, int], x, timesteps, text, text_mask, noise_level):
        if not self.graphs:
            cache = self._caches.setdefault(slot, TextKVCache())
            with self._fast_mode(cache) as m:
                return m(x, timesteps, text, text_mask, noise_level=noise_level)
        return self._replay(x, timesteps, text, text_mask, noise_level)

    # -- CUDA graphs -----------------------------------------------------------------------------------------
    def _host_vector(self, name: str, value, batch: int) -> torch.Tensor:
        """A (B,) fp32 timestep vector on the host, range-checked there (no device synchronisation)."""
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            value = value.detach().cpu()
        return _as_batch_vector(name, value, batch, torch.device("cpu"), self.config.num_train_timesteps)

    def _replay(self, x, timesteps, text, text_mask, noise_level) -> torch.Tensor:
        B = x.shape[0]
        t = self._host_vector("timesteps", timesteps, B)
        nl = self._host_vector("noise_level", 0 if noise_level is None else noise_level, B) \
            if self.config.noise_aug else None
        key = (tuple(x.shape), x.dtype, x.device, tuple(text.shape), text.dtype, text_mask is not None)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(x, t, text, text_mask, nl)
            self._graphs[key] = g
        g.x.copy_(x, non_blocking=True)
        g.t.copy_(t, non_blocking=True)
        if nl is not None:
            g.noise_level.copy_(nl, non_blocking=True)
        if text is not g.source_text or text._version != g.source_version or text_mask is not g.source_mask:
            g.text.copy_(text)  # a new text: the cache recomputes its keys/values into the graph's buffers
            if text_mask is not None:
                g.mask.copy_(text_mask.bool())
            g.source_text, g.source_version, g.source_mask = text, text._version, text_mask
            g.kv.for_text(g.text)
        g.graph.replay()
        return g.out.clone()

    def _capture(self, x, t, text, text_mask, nl) -> _Graph:
        m = self.model
        x, t_dev, text, mask, nl_dev = check_forward_inputs(m, x, t.to(x.device), text, text_mask,
                                                            None if nl is None else nl.to(x.device), False)
        static = dict(x=x.clone(), t=t_dev.clone(), text=text.clone(), mask=None if mask is None else mask.clone(),
                      noise_level=None if nl_dev is None else nl_dev.clone())
        kv = TextKVCache()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream), self._fast_mode(kv):  # warm-up: kernel compilation, autotuning, K/V
            for _ in range(2):
                m.forward_checked(static["x"], static["t"], static["text"], static["mask"], static["noise_level"])
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with self._fast_mode(kv), torch.cuda.graph(graph, pool=self._pool):
            out = m.forward_checked(static["x"], static["t"], static["text"], static["mask"], static["noise_level"])
        log.info("stunet fast backend: captured a CUDA graph for x %s", tuple(x.shape))
        return _Graph(graph=graph, out=out, kv=kv, source_text=text, source_version=text._version,
                      source_mask=text_mask, **static)


def _rows(value, rows: slice, batch: int):
    """Rows of a per-clip argument (a (B,) tensor); scalars and None are shared by every slice."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[rows]
    return value


def make_backend(model: STUNet, name: str = "reference", **kwargs) -> Backend:
    """The executor ``name`` (one of ``BACKENDS``) of ``model``."""
    classes = {"reference": ReferenceBackend, "fast": FastBackend, "compile": CompileBackend}
    if name not in classes:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return classes[name](model, **kwargs)
