"""Shared benchmark harness: timing (CUDA events on GPUs), bytes and FLOPs per row, % of roofline, JSON and a
markdown table. Every benchmark script builds ``Row``s, the stock-PyTorch alternative among them, and calls
``report``.

Roofline: measured in the same run, on the same device. Memory: the bandwidth of a device-to-device copy of a
large buffer (read + write), which bounds what any memory-bound kernel reaches. Compute: the throughput of a large
square matmul in FP16 (FP32 on the CPU), which bounds a model step; a step's "% roofline" is its MFU against it.
The datasheet peaks (``PEAKS``, by device name) are recorded beside the measured ones.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stunet import arguments
from stunet.backends.compile import compile_modes
from stunet.config import PRESETS
from stunet.io import atomic_path, make_folder
from stunet.model.validate import checked_placement

RESULTS = Path(__file__).resolve().parent / "results"

# Datasheet peaks: HBM GB/s and dense FP16 tensor-core TFLOP/s (no sparsity).
PEAKS = {
    "H100 SXM": (3350.0, 989.0),
    "H100 NVL": (3900.0, 835.0),
    "H100 PCIe": (2000.0, 756.0),
    "H100": (3350.0, 989.0),
    "H200": (4800.0, 989.0),
    "A100-SXM4-80GB": (2039.0, 312.0),
    "A100": (1555.0, 312.0),
    "L4": (300.0, 121.0),
    "Orin": (204.8, 42.5),
}


@dataclass
class Row:
    bench: str            # what is measured, e.g. "step ddim cfg"
    shape: str            # the workload, e.g. "ssr 1x3x80x1024x1024 fp16"
    impl: str             # "stunet" or the stock alternative, e.g. "torch ops"
    ms: float
    bytes: float = 0.0    # HBM bytes an ideal implementation moves
    flops: float = 0.0
    extra: dict = field(default_factory=dict)
    gbps: float = 0.0
    tflops: float = 0.0
    pct_roofline: float = 0.0
    speedup: float | None = None  # vs the stock row of the same bench and shape


def parser(name: str, doc: str, iters: int | None = 20) -> argparse.ArgumentParser:
    """The options every script shares: --device, --quick (a smoke run), --iters, --out. Values are checked as
    they are parsed (``stunet.arguments``): a bad one exits with status 2 naming the argument."""
    p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=doc.split("\n")[0])
    p.add_argument("--device", type=device_here, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--quick", action="store_true", help="small shapes (a smoke run; the test suite runs it)")
    if iters is not None:
        p.add_argument("--iters", type=arguments.positive, default=iters, help=f"timed calls per row (default {iters})")
    p.add_argument("--out", type=arguments.folder, default=None,
                   help=f"folder for {name}.json/.md (default bench/results/<gpu>; with --quick "
                        "bench/results/quick/<gpu>)")
    return p


def device_here(text: str) -> str:
    """An argument type: 'cpu', 'cuda' or 'cuda:N', and present on this machine."""
    text = arguments.device(text)
    try:
        checked_placement(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def compile_mode_option(p: argparse.ArgumentParser, default: str, what: str) -> None:
    """--compile-mode: one of this torch's torch.compile modes."""
    p.add_argument("--compile-mode", default=default, choices=compile_modes(),
                   help=f"torch.compile mode {what} (default {default!r})")


def preset_name(text: str) -> str:
    """An argument type: a preset name (``stunet.config.PRESETS``)."""
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"must be a preset, one of {', '.join(PRESETS)}; got {text!r}")
    return text


def command(name: str, argv: list[str] | None) -> str:
    """The command line that reproduces this run, as recorded in the results."""
    args = argv if argv is not None else sys.argv[1:]
    return " ".join([f"python bench/{name}.py", *(shlex.quote(a) for a in args)])


def device_info(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = next((k for k in PEAKS if k.lower() in name.lower()), None)
        bw, tf = PEAKS[key] if key else (0.0, 0.0)
        return {"device": name, "peak_gbps": bw, "peak_tflops_fp16": tf, "torch": torch.__version__,
                "cuda": torch.version.cuda}
    return {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "peak_gbps": 0.0, "peak_tflops_fp16": 0.0, "torch": torch.__version__}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def timeit(fn: Callable[[], object], device: torch.device, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds per call (CUDA events around each call on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def timed_step(bench: str, shape: str, impl: str, step: Callable[[], object], device: torch.device, iters: int,
             flops: float) -> Row:
    """A Row timing a whole denoising step: on CUDA a first call (compile, capture, autotune) runs before the
    peak-memory window; out of memory, in the first call or later, gives a failed row that says so, and the
    memory it held goes back to the device for the next rows."""
    error = None
    try:
        if device.type == "cuda":
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        ms = timeit(step, device, warmup=2, iters=iters)
    except torch.OutOfMemoryError as e:
        error = f"out of memory ({e})"[:200]
    if error is not None:  # out of the except block: the error's traceback, and the tensors it holds, are gone
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return Row(bench, shape, impl, 0.0, flops=flops, extra={"error": error})
    extra = {"tflop_per_step": flops / 1e12}
    if device.type == "cuda":
        extra["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    return Row(bench, shape, impl, ms, flops=flops, extra=extra)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """GB/s of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = timeit(lambda: dst.copy_(src), device)
    return 2 * nbytes / ms / 1e6


def gemm_throughput(device: torch.device, n: int, dtype: torch.dtype) -> float:
    """TFLOP/s of an n x n x n matmul on random data."""
    gen = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=gen) for _ in range(2))
    out = torch.empty_like(a)
    ms = timeit(lambda: torch.mm(a, b, out=out), device)
    return 2 * n**3 / ms / 1e9


def measure_roofline(device: torch.device, quick: bool = False) -> dict:
    """The measured roofline and the datasheet's, as recorded in every result: copy GB/s of 1 GiB (16 MiB when
    ``quick``) and matmul TFLOP/s, FP16 at n = 8192 on a GPU, FP32 at n = 1024 on the CPU (whose FP16 matmul is
    not what a model runs there), n = 256 when ``quick``."""
    info = device_info(device)
    info["copy_gbps"] = copy_bandwidth(device, (1 << 24) if quick else (1 << 30))
    n = 256 if quick else (8192 if device.type == "cuda" else 1024)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    info.update(gemm_tflops=gemm_throughput(device, n, dtype), gemm_n=n, gemm_dtype=str(dtype).removeprefix("torch."))
    info["roofline_gbps"], info["roofline_tflops"] = info["copy_gbps"], info["gemm_tflops"]
    return info


def finish(rows: list[Row], roofline_gbps: float, peak_tflops: float, stock: str) -> None:
    """Fills GB/s, TFLOP/s, % of roofline (memory or compute, whichever bounds the row) and speed-ups.
    Rows that failed (ms == 0, the reason in ``extra["error"]``) keep zeros."""
    rows = [r for r in rows if r.ms > 0]
    for r in rows:
        r.gbps = r.bytes / r.ms / 1e6 if r.bytes else 0.0
        r.tflops = r.flops / r.ms / 1e9 if r.flops else 0.0
        ideal_ms = max(r.bytes / roofline_gbps / 1e6 if roofline_gbps else 0.0,
                       r.flops / peak_tflops / 1e9 if peak_tflops else 0.0)
        r.pct_roofline = 100.0 * ideal_ms / r.ms if ideal_ms else 0.0
    for r in rows:
        base = next((s for s in rows if s.impl == stock and s.bench == r.bench and s.shape == r.shape), None)
        r.speedup = base.ms / r.ms if base is not None else None


def markdown(rows: list[Row], info: dict) -> str:
    notes = any("note" in r.extra for r in rows)  # a last column when some row has a note
    sheet = (f" (datasheet {info['peak_gbps']:.0f} GB/s, {info['peak_tflops_fp16']:.0f} TFLOP/s)"
             if info["peak_gbps"] else "")
    lines = [f"Device: {info['device']}; roofline measured in this run: copy {info['copy_gbps']:.0f} GB/s, "
             f"{'FP16' if info['gemm_dtype'] == 'float16' else 'FP32'} matmul {info['gemm_tflops']:.1f} TFLOP/s "
             f"(n={info['gemm_n']}){sheet}; torch {info['torch']}",
             "",
             "| bench | shape | impl | ms | GB/s | TFLOP/s | % roofline | speed-up |" + (" note |" if notes else ""),
             "|---|---|---|---:|---:|---:|---:|---:|" + ("---|" if notes else "")]
    for r in rows:
        note = f" {r.extra.get('note', '')} |" if notes else ""
        if r.ms <= 0:
            lines.append(f"| {r.bench} | {r.shape} | {r.impl} | {r.extra.get('error', 'failed')} | | | | |{note}")
            continue
        sp = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        pct = f"{r.pct_roofline:.1f}%" if r.pct_roofline else "n/a"
        lines.append(f"| {r.bench} | {r.shape} | {r.impl} | {r.ms:.3f} | {r.gbps:.0f} | {r.tflops:.1f} | "
                     f"{pct} | {sp} |{note}")
    return "\n".join(lines)


def report(name: str, rows: list[Row], device: torch.device, *, stock: str, command: str, quick: bool = False,
           out_dir: Path | None = None) -> dict:
    """Measures the roofline, computes the derived columns, prints the table, writes <out_dir or
    results/<device>>/<name>.json and .md (atomically) and returns the JSON document."""
    info = measure_roofline(device, quick)
    finish(rows, info["roofline_gbps"], info["roofline_tflops"], stock)
    table = markdown(rows, info)
    print(table)
    doc = {"bench": name, "command": command, "stock": stock, **info, "rows": [asdict(r) for r in rows]}
    write_results(name, doc, table, out_dir, quick)
    return doc


def write_results(name: str, doc: dict, table: str, out_dir: Path | None, quick: bool = False) -> Path:
    """<out_dir or results/<device>>/<name>.json (``doc`` with the Python version) and <name>.md (the command
    and ``table``), each written atomically; returns the folder. A ``quick`` (smoke) run's default folder is
    results/quick/<device>, which git ignores: it never replaces a device's committed results."""
    doc = {**doc, "python": sys.version.split()[0], "quick": quick}
    default = RESULTS / "quick" if quick else RESULTS
    out = make_folder(out_dir if out_dir is not None else default / slug(doc["device"].split(" (")[0]), name)
    for suffix, text in ((".json", json.dumps(doc, indent=2)), (".md", f"`{doc['command']}`\n\n{table}\n")):
        with atomic_path(out / f"{name}{suffix}") as tmp:
            tmp.write_text(text)
    return out
