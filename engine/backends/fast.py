"""``fast``: the Triton kernels, a channels-last trunk, text K/V computed once per text, CUDA graphs.

The backend runs its own copy of the model (FP16 weights, channels-last conv weights on CUDA; on the CPU the
copy shares the caller's storage) under the policy ``ExecutionPolicy(kernels=True, channels_last=True,
text_kv=store)``: the ops of ``stunet.kernels`` (GroupNorm+SiLU with the timestep embedding fused in,
temporal attention, TemporalUp's folded conv) in the same module tree as the reference. On CUDA each input
shape's forward is captured once as a CUDA graph and replayed (static buffers; inputs are copied in, the
output is copied out); the graphs of the ``max_graph_shapes`` input shapes used last are kept.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .. import kernels
from ..config import shown
from ..model import FAST, ExecutionPolicy, STUNet, TextKVStore
from ..model.policy import tensor_version
from ..model.validate import _as_batch_vector, check_forward_inputs
from .base import Backend, converted_copy

log = logging.getLogger(__name__)


_KERNEL_NOTES_SAID: set[str] = set()


@dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    x: torch.Tensor
    t: torch.Tensor
    text: torch.Tensor
    mask: torch.Tensor | None
    noise_level: torch.Tensor | None
    out: torch.Tensor
    policy: ExecutionPolicy  # with this graph's own text K/V store: the graph reads its buffers
    source_text: torch.Tensor | None = None  # the caller's text and mask last copied in (identity, version)
    source_version: int | None = -1
    source_mask: torch.Tensor | None = None


class FastBackend(Backend):
    """Kernels, channels-last, stored text keys/values, and CUDA graphs on CUDA (``graphs=False`` to disable).

    ``max_batch``: run larger batches (a CFG pair, batched SSR windows) as sequential slices of at most this
    many clips. Activation memory (skips and working set) scales with the batch, weights do not: a CFG step of
    lumiere-base in halves holds about half the activations, at a small cost in speed.

    ``max_graph_shapes``: the CUDA graphs of at most this many call shapes (input shape, dtype, text shape) are
    kept, with their static inputs and outputs; a new shape beyond them drops the least recently used one's, with
    a warning (a shape used again is captured again: three forwards). A pipeline's stage calls its backend with
    one or two shapes (the SSR stage's last window batch may be smaller), so the default holds a few
    resolutions or prompt batch sizes in turn; a server with more raises it.
    """

    name = "fast"

    def __init__(self, model: STUNet, *, graphs: bool | None = None, max_batch: int | None = None,
                 max_graph_shapes: int = 4):
        super().__init__(model)
        if max_batch is not None and not _positive(max_batch):
            raise ValueError(f"max_batch must be a positive integer or None, got {shown(max_batch)}")
        if not _positive(max_graph_shapes):
            raise ValueError(f"max_graph_shapes must be a positive integer, got {shown(max_graph_shapes)}")
        reasons = self.unsupported(model, graphs=graphs)
        if reasons:
            raise ValueError("the fast backend cannot run this model: " + "; ".join(reasons))
        device = model.device
        self.max_batch, self.max_graph_shapes = max_batch, max_graph_shapes
        self.graphs = device.type == "cuda" if graphs is None else graphs
        dtype = torch.float16 if device.type == "cuda" else model.dtype
        self.model = converted_copy(model, dtype, channels_last_weights=device.type == "cuda")
        self.policy = FAST
        self.kernel_note = kernels.unavailable_on(device)
        if self.kernel_note:  # said once per reason (a cascade makes a backend per model), then in describe()
            (log.info if self.kernel_note in _KERNEL_NOTES_SAID else log.warning)(
                "stunet fast backend: the Triton kernels cannot run here (%s); its ops run their reference math "
                "(the channels-last trunk and text K/V store still apply)", self.kernel_note)
            _KERNEL_NOTES_SAID.add(self.kernel_note)
        # Eager calls' text K/V, one store per batch slice so that slices do not evict each other.
        self._stores: dict[tuple[int, int], TextKVStore] = {}
        self._slices: dict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = {}
        # Graphs by call shape (least recently used first), then by batch slice.
        self._graphs: OrderedDict[tuple, dict[tuple[int, int], _Graph]] = OrderedDict()
        self._evicted = self._told_text_lengths = False
        self._pool = None

    @classmethod
    def unsupported(cls, model: STUNet, *, graphs: bool | None = None, **options) -> list[str]:
        reasons = super().unsupported(model, **options)
        if not (graphs is None or isinstance(graphs, bool)):
            reasons.append(f"graphs must be True, False or None (None: on CUDA), got {shown(graphs)}")
        if model.dtype == torch.float64:
            reasons.append("float64 weights (the kernels take fp16, bf16 and fp32; convert with model.float())")
        if graphs and model.device.type != "cuda":
            reasons.append(f"graphs=True needs the model on a CUDA device, it is on {model.device.type}")
        return reasons

    def describe(self) -> str:
        ops = (f"reference math for the kernel ops ({self.kernel_note})" if self.kernel_note
               else "Triton kernels (GroupNorm+SiLU, temporal attention)")
        graphs = ", CUDA graphs" if self.graphs else ""
        slices = f", batches in slices of {self.max_batch}" if self.max_batch else ""
        return (f"fast: {ops}, channels-last trunk, text K/V once per text{graphs}{slices}; "
                f"{self.model.dtype} on {self.model.device}")

    def forward(self, x, timesteps, text, text_mask=None, *, noise_level=None):
        # Outside inference mode whatever the caller's: the buffers kept across calls (graph inputs, stored text
        # keys/values) are written in place, which an inference tensor refuses outside torch.inference_mode.
        with torch.inference_mode(False), torch.no_grad():
            return self._forward(x, timesteps, text, text_mask, noise_level)

    def _forward(self, x, timesteps, text, text_mask, noise_level):
        if not (isinstance(x, torch.Tensor) and x.dim() and isinstance(text, torch.Tensor)):
            check_forward_inputs(self.model, x, timesteps, text, text_mask, noise_level, False)  # raises, by name
        B = x.shape[0]
        graphs = self._graphs_of(x, text, text_mask) if self.graphs else None
        if self.max_batch is None or B <= self.max_batch:
            return self._run(graphs, (0, B), x, timesteps, text, text_mask, noise_level)
        parts = []
        for i in range(0, B, self.max_batch):
            rows = slice(i, min(i + self.max_batch, B))
            parts.append(self._run(graphs, (rows.start, rows.stop), x[rows], _rows(timesteps, rows, B),
                                   self._slice("text", text, rows),
                                   None if text_mask is None else self._slice("mask", text_mask, rows),
                                   _rows(noise_level, rows, B)))
        return torch.cat(parts)

    def _slice(self, what: str, t: torch.Tensor, rows: slice) -> torch.Tensor:
        """The same slice object for the same (unchanged) text at every call: the text K/V store keys on
        tensor identity. One entry per slice position, replaced when the text changes (at every call for an
        inference tensor, whose changes are not counted)."""
        key = (what, rows.start, rows.stop)
        cached = self._slices.get(key)
        version = tensor_version(t)
        if cached is None or cached[0] is not t or version is None or cached[1] != version:
            cached = self._slices[key] = (t, version, t[rows])
        return cached[2]

    def _run(self, graphs: dict | None, slot: tuple[int, int], x, timesteps, text, text_mask, noise_level):
        if graphs is None:
            policy = dataclasses.replace(self.policy, text_kv=self._stores.setdefault(slot, TextKVStore()))
            return self.model(x, timesteps, text, text_mask, noise_level=noise_level, policy=policy)
        return self._replay(graphs, slot, x, timesteps, text, text_mask, noise_level)

    # -- CUDA graphs -----------------------------------------------------------------------------------------
    def _graphs_of(self, x: torch.Tensor, text: torch.Tensor, text_mask) -> dict[tuple[int, int], _Graph]:
        """The graphs of this call's shape, by batch slice (empty for a new shape), now the most recently used;
        a new shape past ``max_graph_shapes`` drops the least recently used shape's graphs."""
        key = (tuple(x.shape), x.dtype, x.device, tuple(text.shape), text.dtype, text_mask is not None)
        graphs = self._graphs.get(key)
        if graphs is not None:
            self._graphs.move_to_end(key)
            return graphs
        if not self._told_text_lengths and any(_another_text_length(key, k) for k in self._graphs):
            self._told_text_lengths = True
            log.warning("stunet fast backend: a text of %d tokens is a new input shape for the CUDA graphs, captured "
                        "anew (three forwards); pad prompts to one length, e.g. load_text_encoder(..., "
                        "pad_to_max_length=True), for every request to reuse the same graphs", key[3][1])
        while len(self._graphs) >= self.max_graph_shapes:
            (shape, *_), dropped = self._graphs.popitem(last=False)
            (log.info if self._evicted else log.warning)(
                "stunet fast backend: dropped the CUDA graphs of x %s (%d slice(s)) to keep those of %d input "
                "shapes (max_graph_shapes); a shape used again is captured again", shape, len(dropped),
                self.max_graph_shapes)
            self._evicted = True
        graphs = self._graphs[key] = {}
        return graphs

    def _host_vector(self, name: str, value, batch: int) -> torch.Tensor:
        """A (B,) fp32 timestep vector on the host, range-checked there (no device synchronisation)."""
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            value = value.detach().cpu()
        return _as_batch_vector(name, value, batch, torch.device("cpu"), self.config.num_train_timesteps)

    def _replay(self, graphs: dict[tuple[int, int], _Graph], slot: tuple[int, int], x, timesteps, text, text_mask,
                noise_level) -> torch.Tensor:
        """One graph per batch slice of a call shape (``graphs``): like the eager stores, each slice's graph keeps
        its own text K/V (the halves of a CFG pair in slices of one would otherwise refresh a shared graph's
        every call); the graphs share one memory pool, so their activations take the room of one."""
        B = x.shape[0]
        t = self._host_vector("timesteps", timesteps, B)
        nl = self._host_vector("noise_level", 0 if noise_level is None else noise_level, B) \
            if self.config.noise_aug else None
        g = graphs.get(slot)
        if g is None:
            g = graphs[slot] = self._capture(x, t, text, text_mask, nl)
        g.x.copy_(x, non_blocking=True)
        g.t.copy_(t, non_blocking=True)
        if nl is not None:
            g.noise_level.copy_(nl, non_blocking=True)
        version = tensor_version(text)
        if (text is not g.source_text or version is None or version != g.source_version
                or text_mask is not g.source_mask):
            g.text.copy_(text)  # a new text: the store recomputes its keys/values into the graph's buffers
            if text_mask is not None:
                g.mask.copy_(text_mask.bool())
            g.policy.text_kv.for_text(g.text)
            # Only now: a refresh cut short (an exception, Ctrl-C) is done again by the next call.
            g.source_text, g.source_version, g.source_mask = text, version, text_mask
        g.graph.replay()
        return g.out.clone()

    def _capture(self, x, t, text, text_mask, nl) -> _Graph:
        m = self.model
        x, t_dev, text, mask, nl_dev = check_forward_inputs(m, x, t.to(x.device), text, text_mask,
                                                            None if nl is None else nl.to(x.device), False)
        static = dict(x=x.clone(), t=t_dev.clone(), text=text.clone(), mask=None if mask is None else mask.clone(),
                      noise_level=None if nl_dev is None else nl_dev.clone())
        policy = dataclasses.replace(self.policy, text_kv=TextKVStore())
        args = (static["x"], static["t"], static["text"], static["mask"], static["noise_level"], policy)
        graph, out = self._record(lambda: m.forward_checked(*args), x.device)
        log.info("stunet fast backend: captured a CUDA graph for x %s", tuple(x.shape))
        return _Graph(graph=graph, out=out, policy=policy, source_text=text, source_version=tensor_version(text),
                      source_mask=text_mask, **static)

    def _record(self, run, device: torch.device):
        """``run()`` captured as a CUDA graph in the backend's memory pool, after two warm-up runs on a side
        stream (kernel compilation, autotuning, the text K/V): (the graph, its output)."""
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return graph, out


def _another_text_length(a: tuple, b: tuple) -> bool:
    """Whether graph keys ``a`` and ``b`` differ in the text's length alone (x, dtypes, device, text batch)."""
    (x_a, dtype_a, device_a, text_a, text_dtype_a, _), (x_b, dtype_b, device_b, text_b, text_dtype_b, _) = a, b
    return ((x_a, dtype_a, device_a, text_dtype_a, text_a[0]) == (x_b, dtype_b, device_b, text_dtype_b, text_b[0])
            and text_a[1] != text_b[1])


def _positive(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _rows(value, rows: slice, batch: int):
    """Rows of a per-clip argument (a (B,) tensor); scalars and None are shared by every slice."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch:
        return value[rows]
    return value
