"""One generation shared among 1, 2 and N ranks (stunet.distributed): seconds per stage and the share of each
rank's step time spent communicating.

    python bench/distributed.py                          # lumiere-base + lumiere-ssr, 1, 2 and all GPUs
    python bench/distributed.py --nproc 1 --nproc 2 --steps 4 --ssr-steps 2
    python bench/distributed.py --device cpu --quick     # tiny models on CPU processes (gloo)

Each rank count runs in its own torchrun launch of this script (``--worker``). The stock row is one process
with the pipeline's batched calls (no process group). "comm %" is rank 0's time in the step exchanges
(all-gathers and the error/shape handshake) over its time in shared steps; on one rank it is zero.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Row, command, parser, report  # noqa: E402

import stunet  # noqa: E402
from stunet import Pipeline, SSROptions, STUNet, STUNetConfig, arguments  # noqa: E402

TINY_SSR = dict(in_channels=6, noise_aug=True, low_res_size=8, temporal_downsample=(False, False),
                temporal_attn_depth=0, sample_size=16)


def generate(args, parallel) -> dict:
    """Times one generation on this process; its stage seconds and, when shared, rank 0's exchange share."""
    device = stunet.distributed.device() if args.device == "cuda" else torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        presets = (("tiny", {}), ("tiny", TINY_SSR)) if args.quick else (("lumiere-base", {}), ("lumiere-ssr", {}))
        base, ssr = (STUNet(STUNetConfig.from_preset(name, **over)) for name, over in presets)
    base, ssr = base.to(dtype).eval(), ssr.to(dtype).eval()
    pipe = Pipeline(base, None, ssr, progress=False, parallel=parallel)
    cfg = base.config
    frames, size = (8, 8) if args.quick else (cfg.sample_frames, cfg.sample_size)
    text = torch.randn(1, 77, cfg.text_dim, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    ssr_options = SSROptions(num_inference_steps=args.ssr_steps, window=4 if args.quick else 16,
                             overlap=1 if args.quick else 2, batch_size=args.ssr_batch)
    call = dict(prompt_embeds=text, num_frames=frames, height=size, width=size, guidance_scale=7.5, seed=0)
    pipe(**call, num_inference_steps=1, ssr=SSROptions(**{**ssr_options.__dict__, "num_inference_steps": 1}))  # warm-up
    t0 = time.perf_counter()
    res = pipe(**call, num_inference_steps=args.steps, ssr=ssr_options)
    out = {"total_s": time.perf_counter() - t0, **{f"{k}_s": v for k, v in res.timings.items()},
           "label": f"{'tiny' if args.quick else 'lumiere-base + lumiere-ssr'} {frames} frames, "
                    f"{args.steps}+{args.ssr_steps} steps"}
    if pipe.parallel is not None:
        out["world"] = pipe.parallel.world_size
        out.update({f"{k}_comm_share": v.communication_share for k, v in pipe.parallel.stats.items()})
    return out


def launch(nproc: int, args, argv) -> dict:
    """This script's worker on ``nproc`` ranks through torchrun; rank 0's result."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rank0.json"
        env = {**os.environ, "STUNET_BENCH_RESULT": str(result)}
        run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                              str(nproc), "--log-dir", str(Path(tmp) / "torchrun"), __file__, "--worker", *argv],
                             env=env, capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": run.stderr.strip().splitlines()[-1][:200] if run.stderr.strip() else "failed"}
        return json.loads(result.read_text())


def main(argv=None) -> dict:
    p = parser("distributed", __doc__, iters=None)
    p.add_argument("--nproc", type=arguments.positive, action="append",
                   help="rank counts (repeatable; default 1, 2 and every GPU)")
    p.add_argument("--steps", type=arguments.positive, default=8)
    p.add_argument("--ssr-steps", type=arguments.positive, default=4)
    p.add_argument("--ssr-batch", type=arguments.positive, default=1,
                   help="SSR windows per model call (default 1: one per rank)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.ssr_steps = min(args.steps, 2), min(args.ssr_steps, 2)
    if args.worker:  # one rank of a torchrun launch
        stunet.distributed.init()
        if args.device == "cpu":  # the cores shared among the ranks
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
        out = generate(args, "auto")
        if int(os.environ["RANK"]) == 0:
            Path(os.environ["STUNET_BENCH_RESULT"]).write_text(json.dumps(out))
        stunet.distributed.leave(0)

    device = torch.device(args.device)
    counts = args.nproc or sorted({1, 2, max(2, torch.cuda.device_count())})
    forward = _drop(argv, ("--nproc", "--out"))
    results = {"1 process (batched)": generate(args, False)}
    for n in counts:
        results[f"{n} rank{'s' if n > 1 else ''}"] = launch(n, args, forward)
    rows = []
    for impl, r in results.items():
        if "error" in r:
            rows.append(Row("video", "", impl, 0.0, extra={"error": r["error"]}))
            continue
        extra = {k: v for k, v in r.items() if k not in ("label", "total_s")}
        rows.append(Row("video", r["label"], impl, r["total_s"] * 1e3, extra=extra))
        for stage in ("base", "ssr"):
            share = r.get(f"{stage}_comm_share")
            note = {} if share is None else {"note": f"comm {100 * share:.1f}% of step time"}
            rows.append(Row(f"stage {stage}", r["label"], impl, r[f"{stage}_s"] * 1e3, extra=note))
    return report("distributed", rows, device, stock="1 process (batched)", command=command("distributed", argv),
                  quick=args.quick, out_dir=args.out)


def _drop(argv: list[str], options: tuple[str, ...]) -> list[str]:
    """argv without the given options (and their values)."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in options:
            skip = True
        elif not any(token.startswith(o + "=") for o in options):
            out.append(token)
    return out


if __name__ == "__main__":
    main()
