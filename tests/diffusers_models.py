"""Tiny random diffusers models and pipeline folders, built offline (no downloads): the stand-ins the
conversion, latent-pipeline and README tests run on."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (zero-initialised layers too: otherwise they hide mapping errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def clip(folder: Path, max_length: int = 16):
    """(CLIPTokenizer over single bytes with no merges, tiny random CLIPTextModel of width 24)."""
    import transformers

    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, extra = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    chars = sorted(chr(c) for c in cs)
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                                           model_max_length=max_length)
    config = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=24, intermediate_size=37,
                                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=max_length,
                                         bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1,
                                         pad_token_id=len(vocab) - 1)
    torch.manual_seed(0)
    return tokenizer, transformers.CLIPTextModel(config).eval()


def vae(levels: int = 2):
    """A tiny random AutoencoderKL with 4 latent channels; ``2 ** (levels - 1)`` pixels per latent."""
    import diffusers

    widths = (8, 8, 16, 16)[-levels:]
    return randomized(diffusers.AutoencoderKL(
        block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, latent_channels=4, norm_num_groups=4, sample_size=32), 5)


FAST = dict(widths=(8, 8, 16), groups=4, head_dim=2, cross=(False, False, True))
"""A stand-in cheap enough to run at a real checkpoint's frame size on a CPU (spatial attention only at the
coarsest of three levels)."""


def _blocks(kind: str, cross: tuple[bool, ...]) -> dict:
    down = tuple(f"CrossAttnDownBlock{kind}" if c else f"DownBlock{kind}" for c in cross)
    up = tuple(f"CrossAttnUpBlock{kind}" if c else f"UpBlock{kind}" for c in reversed(cross))
    return dict(down_block_types=down, up_block_types=up)


def unet3d(text_dim: int = 24, widths=(32, 64), groups: int = 8, head_dim: int = 8, cross=(True, False)):
    import diffusers

    return randomized(diffusers.UNet3DConditionModel(
        block_out_channels=widths, layers_per_block=1, cross_attention_dim=text_dim, attention_head_dim=head_dim,
        norm_num_groups=groups, sample_size=16, **_blocks("3D", cross)), 1)


def unet2d(text_dim: int = 24, widths=(32, 64), groups: int = 8, head_dim: int = 8, cross=(True, False)):
    import diffusers

    return randomized(diffusers.UNet2DConditionModel(
        block_out_channels=widths, layers_per_block=1, cross_attention_dim=text_dim, attention_head_dim=head_dim,
        norm_num_groups=groups, sample_size=16, **_blocks("2D", cross)), 1)


def motion_adapter(widths=(32, 64), groups: int = 8):
    import diffusers

    return randomized(diffusers.MotionAdapter(
        block_out_channels=widths, motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=groups, motion_max_seq_length=24), 2)


def sd_ddim(beta_schedule: str = "scaled_linear"):
    """DDIM with Stable Diffusion's settings (AnimateDiff's use the "linear" beta schedule)."""
    import diffusers

    return diffusers.DDIMScheduler(beta_schedule=beta_schedule, beta_start=0.00085, beta_end=0.012, steps_offset=1,
                                   set_alpha_to_one=False, clip_sample=False)


def text_to_video_pipeline(tmp: Path, vae_levels: int = 2, **unet):
    """A TextToVideoSDPipeline (ModelScope / ZeroScope's layout) of tiny random parts."""
    import diffusers

    tokenizer, text_encoder = clip(tmp / "tokenizer-files")
    return diffusers.TextToVideoSDPipeline(vae=vae(vae_levels), text_encoder=text_encoder, tokenizer=tokenizer,
                                           unet=unet3d(**unet), scheduler=sd_ddim())


def animatediff_pipeline(tmp: Path, vae_levels: int = 2):
    """An AnimateDiffPipeline (an SD U-Net + a MotionAdapter) of tiny random parts."""
    import diffusers

    tokenizer, text_encoder = clip(tmp / "tokenizer-files")
    return diffusers.AnimateDiffPipeline(vae=vae(vae_levels), text_encoder=text_encoder, tokenizer=tokenizer,
                                         unet=unet2d(), motion_adapter=motion_adapter(), scheduler=sd_ddim("linear"))


def save_sd_folder(folder: Path, vae_levels: int = 4, **unet) -> None:
    """A Stable Diffusion 1.x-style pipeline folder (unet, vae, text_encoder, tokenizer, scheduler), tiny."""
    tokenizer, text_encoder = clip(folder.parent / f".{folder.name}-tokenizer-files")
    unet2d(**unet).save_pretrained(folder / "unet")
    vae(vae_levels).save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    tokenizer.save_pretrained(folder / "tokenizer")
    sd_ddim().save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
