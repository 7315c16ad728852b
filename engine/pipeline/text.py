"""Text encoders: prompts -> (tokens (B, L, D), mask (B, L)) for the model's cross-attention.

``TextEncoder`` is the small interface the pipeline needs. ``HFTextEncoder`` wraps a transformers encoder
and its tokenizer (T5 encoder or CLIP text model, from a local directory: ``load_text_encoder(path)``).
``tiny_random_t5`` builds a small random T5 encoder with the byte-level ByT5 tokenizer (needs no files): the
stand-in used by tests and by ``stunet generate`` without ``--text-encoder``. Prompt embeddings computed
elsewhere can be given to the pipeline directly (``prompt_embeds=``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import torch


class TextEncoder(Protocol):
    dim: int
    """Width of the returned tokens; must equal the model's ``config.text_dim``."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, dim) float, mask (B, L) bool) for a list of prompts, all padded to one length L."""


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("text encoders need transformers: pip install 'stunet[text]'") from None
    return transformers


class HFTextEncoder:
    """A transformers encoder model + tokenizer; tokens are the encoder's last hidden state."""

    def __init__(self, model, tokenizer, max_length: int = 128, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be a list of strings")
        batch = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()


def load_text_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                      max_length: int | None = None) -> HFTextEncoder:
    """A T5 encoder or CLIP text model saved with ``save_pretrained`` (model + tokenizer) in ``path``."""
    transformers = _require_transformers()
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder directory {str(path)!r} has no config.json")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = getattr(config, "model_type", "")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    if kind in ("t5", "mt5", "umt5"):
        model = transformers.T5EncoderModel.from_pretrained(path, local_files_only=True)
        return HFTextEncoder(model, tokenizer, max_length or 128, device)
    if kind in ("clip", "clip_text_model"):
        model = transformers.CLIPTextModel.from_pretrained(path, local_files_only=True)
        return HFTextEncoder(model, tokenizer, max_length or 77, device)
    raise ValueError(f"text encoder in {str(path)!r} has model_type {kind!r}; supported: t5 and clip")


def tiny_random_t5(dim: int, seed: int = 0, layers: int = 2, heads: int = 2) -> HFTextEncoder:
    """A random T5 encoder of width ``dim`` with the ByT5 byte tokenizer: offline, deterministic per seed."""
    transformers = _require_transformers()
    if dim % heads:
        heads = 1
    config = transformers.T5Config(vocab_size=384, d_model=dim, d_kv=dim // heads, d_ff=2 * dim,
                                   num_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu")
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = transformers.T5EncoderModel(config)
    finally:
        torch.random.set_rng_state(gen_state)
    return HFTextEncoder(model, transformers.ByT5Tokenizer(), max_length=64)
