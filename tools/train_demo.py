"""Trains the demo cascade that ships inside the package (``stunet.demo``) from scratch, with a fixed seed:
a word-level text encoder and the base model (16 frames of 16 x 16) jointly, then the SSR model (16 -> 64 on
windows of 8 frames) on the frozen text encoder; v-prediction on the cosine schedule, AdamW, an exponential
moving average of the weights (what is saved). The clips are drawn on the fly by ``stunet.demo.render``.

    python tools/train_demo.py --out engine/demo/weights     # the shipped weights: about 55 min on 2 CPU cores

At the end it generates the check prompts with the saved cascade (the CLI's defaults) and prints how each
follows its prompt (``stunet.demo.follows``); ``--check DIR`` only does that for an existing folder.
Writes DIR/base, DIR/ssr (model folders), DIR/text (the word encoder) and DIR/training.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import stunet
from stunet import arguments, demo
from stunet.io import atomic_write_text
from stunet.pipeline.stages import upsample_video
from stunet.pipeline.text import WordEncoder
from stunet.sampling.samplers import make_betas

CHECK_PROMPTS = ["a red circle moving left", "a blue square moving right", "a green triangle moving up",
                 "a yellow circle moving down", "a white square growing", "a red triangle shrinking",
                 "a blue circle moving right on a striped background", "a green square moving left"]


def area_down(clips: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, T, S, S) -> (B, 3, T, size, size) by pixel averaging (what a camera at the lower resolution sees)."""
    B, C, T, S, _ = clips.shape
    folded = clips.transpose(1, 2).reshape(B * T, C, S, S)
    return F.interpolate(folded, size=(size, size), mode="area").reshape(B, T, C, size, size).transpose(1, 2)


class Diffusion:
    """The training side of the models' schedule: x_t and the v target at integer timesteps."""

    def __init__(self, config: stunet.STUNetConfig):
        self.abar = torch.cumprod(1 - make_betas(config.schedule, config.num_train_timesteps), 0).float()
        self.steps = config.num_train_timesteps

    def noised(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.abar[t].reshape(-1, *([1] * (x0.dim() - 1)))
        return a.sqrt() * x0 + (1 - a).sqrt() * noise, a.sqrt() * noise - (1 - a).sqrt() * x0


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay, self.updates = copy.deepcopy(module).eval().requires_grad_(False), decay, 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.module.parameters(), module.parameters()):
            e.lerp_(p.detach(), 1 - d)


def schedule(step: int, steps: int, warmup: int) -> float:
    """Learning-rate factor: linear warm-up, then cosine down to 10 %."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def train(name: str, modules: list[torch.nn.Module], loss_of, steps: int, lr: float, ema_decay: float):
    """``steps`` AdamW steps on ``loss_of(step)``; the EMA copies of ``modules`` and the last losses."""
    params = [p for m in modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    emas = [EMA(m, ema_decay) for m in modules]
    losses = []
    bar = tqdm(range(steps), desc=name, file=sys.stderr)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * schedule(step, steps, warmup=min(200, steps // 10 + 1))
        loss = loss_of(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for ema, m in zip(emas, modules):
            ema.update(m)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-100:]) / len(losses[-100:]):.4f}")
    return [e.module for e in emas], sum(losses[-200:]) / len(losses[-200:])


def train_base(args, gen: torch.Generator):
    config = demo.base_config()
    model, text = stunet.STUNet(config).train(), WordEncoder(demo.VOCAB, demo.TEXT_DIM)
    torch.nn.init.normal_(text.embedding.weight, std=1.0)
    diffusion = Diffusion(config)

    def loss_of(step: int) -> torch.Tensor:
        clips, captions = demo.batch(args.batch, gen, drop_caption=0.1)
        x0 = area_down(clips, config.sample_size)
        t = torch.randint(0, diffusion.steps, (len(x0),), generator=gen)
        xt, v = diffusion.noised(x0, t, torch.randn(x0.shape, generator=gen))
        ids, mask = text.tokenize(captions)
        return F.mse_loss(model(xt, t, text(ids), mask), v)

    (model, text), loss = train("base", [model, text], loss_of, args.base_steps, args.lr, args.ema)
    return model, text, loss


def train_ssr(args, text: WordEncoder, gen: torch.Generator):
    config = demo.ssr_config()
    model = stunet.STUNet(config).train()
    diffusion = Diffusion(config)

    def loss_of(step: int) -> torch.Tensor:
        clips, captions = demo.batch(args.ssr_batch, gen, frames=config.window_frames, drop_caption=0.1)
        up = upsample_video(area_down(clips, config.low_res_size), config.sample_size, config.sample_size)
        aug = torch.randint(0, 250, (len(clips),), generator=gen) * (torch.rand(len(clips), generator=gen) < 0.5)
        up, _ = diffusion.noised(up, aug, torch.randn(up.shape, generator=gen))
        t = torch.randint(0, diffusion.steps, (len(clips),), generator=gen)
        xt, v = diffusion.noised(clips, t, torch.randn(clips.shape, generator=gen))
        with torch.no_grad():
            tokens, mask = text.encode(captions)
        return F.mse_loss(model(torch.cat([xt, up], 1), t, tokens, mask, noise_level=aug), v)

    (model,), loss = train("ssr", [model], loss_of, args.ssr_steps, args.lr, args.ema)
    return model, loss


def check(folder: Path, seed: int = 0) -> list[dict]:
    """Generates every check prompt with the cascade in ``folder`` (the CLI's defaults) and measures it."""
    base = stunet.STUNet.from_pretrained(folder / "base", dtype=torch.float32)
    ssr = stunet.STUNet.from_pretrained(folder / "ssr", dtype=torch.float32)
    pipe = stunet.Pipeline(base, WordEncoder.load(folder / "text"), ssr, progress=False)
    results = []
    for prompt in CHECK_PROMPTS:
        frames = pipe(prompt, seed=seed, num_inference_steps=32, guidance_scale=7.5).frames[0]
        r = demo.follows(frames, prompt)
        results.append(r)
        print(f"{'ok  ' if r['ok'] else 'MISS'} {prompt:<52} share {r['share']:.2f}  along {r['along']:+.2f}  "
              f"across {r['across']:+.2f}  growth {r['growth']:.2f}", file=sys.stderr)
    print(f"{sum(r['ok'] for r in results)}/{len(results)} check prompts followed", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=arguments.folder, help="folder for base/, ssr/, text/ and training.json")
    p.add_argument("--check", type=Path, metavar="DIR", help="only generate and measure the check prompts of DIR")
    p.add_argument("--seed", type=arguments.seed, default=0)
    p.add_argument("--base-steps", type=arguments.positive, default=2800)
    p.add_argument("--ssr-steps", type=arguments.positive, default=700)
    p.add_argument("--batch", type=arguments.positive, default=16, help="base clips per step")
    p.add_argument("--ssr-batch", type=arguments.positive, default=4, help="SSR windows per step")
    p.add_argument("--lr", type=arguments.number(0, lo_open=True), default=2e-3)
    p.add_argument("--ema", type=arguments.number(0, 1), default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--threads", type=arguments.positive, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if (args.out is None) == (args.check is None):
        p.error("give --out DIR (train) or --check DIR (measure), one of them")
    if args.check and not all((args.check / part).is_dir() for part in ("base", "ssr", "text")):
        p.error(f"--check: {args.check} is not a folder with base/, ssr/ and text/ (what --out writes)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return 0 if all(r["ok"] for r in check(args.check, args.seed)) else 1

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    base, text, base_loss = train_base(args, gen)
    base.half().save_pretrained(args.out / "base")  # fp16 on disk (half the size); loaded as fp32
    text.save(args.out / "text")
    ssr, ssr_loss = train_ssr(args, text, gen)
    ssr.half().save_pretrained(args.out / "ssr")
    minutes = (time.perf_counter() - start) / 60
    results = check(args.out, args.seed)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "torch": torch.__version__, "threads": torch.get_num_threads(), "minutes": round(minutes, 1),
              "final_loss": {"base": round(base_loss, 5), "ssr": round(ssr_loss, 5)},
              "check": [{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()} for r in results]}
    atomic_write_text(args.out / "training.json", json.dumps(record, indent=2) + "\n")
    print(f"trained in {minutes:.1f} min; wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
