"""Text encoders: prompts -> (tokens (B, L, D), mask (B, L)) for the model's cross-attention.

``TextEncoder`` is the small interface the pipeline needs. ``HFTextEncoder`` wraps a transformers encoder
and its tokenizer (T5 encoder or CLIP text model, from a local directory: ``load_text_encoder(path)``).
``tiny_random_t5`` builds a small random T5 encoder with the byte-level ByT5 tokenizer (needs no files): the
stand-in used by tests and by ``stunet generate`` without ``--text-encoder``. Prompt embeddings computed
elsewhere can be given to the pipeline directly (``prompt_embeds=``).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path
from typing import Protocol

import torch

from ..config import check_flags, check_volume, shown
from ..io import folder_load_errors
from ..model.validate import checked_placement

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    dim: int
    """Width of the returned tokens; must equal the model's ``config.text_dim``."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (B, L, dim) float, mask (B, L) bool) for a list of prompts, all padded to one length L."""


_TOKENIZING = threading.Lock()
"""Held while a tokenizer runs. A Rust-backed tokenizer sets its padding and truncation on the (possibly shared)
object at a call, which a call in flight on another thread can refuse ("RuntimeError: Already borrowed", with
tokenizers before 0.23.1). Tokenizing takes microseconds: one lock for every encoder costs nothing."""


NEEDS_TRANSFORMERS = "text encoders need transformers: pip install 'stunet[text]'"


def missing_transformers() -> str | None:
    """Why no text encoder can be built here (transformers is not installed), or None: known before any model is
    built, not after it."""
    return None if importlib.util.find_spec("transformers") is not None else NEEDS_TRANSFORMERS


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(NEEDS_TRANSFORMERS) from None
    return transformers


class HFTextEncoder:
    """A transformers encoder model + tokenizer; tokens are the encoder's last hidden state.

    ``pad_to_max_length=True, attend_padding=True`` is the Stable Diffusion family's use of CLIP: every prompt
    padded to ``max_length`` tokens, encoded without an attention mask, and all of them attended to (the mask
    returned is all True), as the U-Nets were trained.
    """

    def __init__(self, model, tokenizer, max_length: int = 128, device: str | torch.device = "cpu", *,
                 pad_to_max_length: bool = False, attend_padding: bool = False):
        check_max_length(max_length)
        check_flags(pad_to_max_length=pad_to_max_length, attend_padding=attend_padding)
        self.model = model.eval().to(checked_placement(device)[0])
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_max_length, self.attend_padding = pad_to_max_length, attend_padding
        self.dim = int(model.config.hidden_size if hasattr(model.config, "hidden_size") else model.config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        check_prompts(prompts)
        with _TOKENIZING:
            batch = self.tokenizer(list(prompts), padding="max_length" if self.pad_to_max_length else True,
                                   truncation=True, max_length=self.max_length, return_tensors="pt")
            full = [p for p, n in zip(prompts, batch["attention_mask"].sum(1).tolist()) if n == self.max_length]
            whole = self.tokenizer(full, truncation=False, verbose=False)["input_ids"] if full else []
        for prompt, ids in zip(full, whole):  # rows that fill the encoder: were they cut?
            if len(ids) > self.max_length:  # what the truncated row leaves out, before its end-of-text token
                dropped = self.tokenizer.decode(ids[self.max_length - 1:], skip_special_tokens=True)
                log.warning("stunet: the text encoder reads %d tokens and the prompt %r has %d: its end %r is left "
                            "out", self.max_length, _shortened(prompt), len(ids), dropped)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        if self.attend_padding:
            hidden = self.model(input_ids=ids).last_hidden_state
            return hidden.float(), torch.ones_like(mask, dtype=torch.bool)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden.float(), mask.bool()


def check_prompts(prompts, name: str = "prompts") -> None:
    """What a text encoder's ``encode`` takes: a non-empty list of strings (``name``: the argument's)."""
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError(f"{name} must hold at least one prompt, got an empty list")


def check_max_length(max_length, optional: bool = False) -> None:
    """A text encoder's ``max_length``: a positive number of tokens (or None, its default, with ``optional``)."""
    if optional and max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens{' or None' if optional else ''}, "
                         f"got {shown(max_length)}")


def _shortened(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def load_text_encoder(path: str | os.PathLike, device: str | torch.device = "cpu",
                      max_length: int | None = None, *, dtype: torch.dtype | None = None,
                      tokenizer: str | os.PathLike | None = None, sd_style: bool = False,
                      pad_to_max_length: bool | None = None) -> HFTextEncoder:
    """A T5 encoder or CLIP text model saved with ``save_pretrained`` in ``path``, with its tokenizer (in
    ``path``, or the ``tokenizer`` folder of a diffusers pipeline), its weights in ``dtype`` (None: the file's;
    T5-XXL's are 19 GB in fp32, 9.5 GB in fp16). ``sd_style``: as the Stable Diffusion family's pipelines use
    CLIP (padded to the tokenizer's length, padding attended; see HFTextEncoder).

    ``pad_to_max_length``: True pads every prompt to ``max_length`` tokens (masked), so every request has one
    text shape, which the fast backend's CUDA graphs and torch.compile then reuse; the default (None) pads T5
    prompts to the longest of a call and CLIP ones as ``sd_style`` says."""
    checked_placement(device, dtype)
    check_max_length(max_length, optional=True)
    check_flags(sd_style=sd_style)
    check_flags(optional=True, pad_to_max_length=pad_to_max_length)
    transformers = _require_transformers()
    path = check_text_encoder_folder(path)
    with folder_load_errors("text encoder's config", path):
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    kind = getattr(config, "model_type", "")
    with folder_load_errors("tokenizer", tokenizer or path):
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer or path, local_files_only=True)
    options: dict[str, object] = {"local_files_only": True}
    if dtype is not None:  # the keyword's name since transformers 4.56; torch_dtype before
        from packaging.version import Version  # a transformers dependency

        options["dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"] = dtype
    if kind in ("t5", "mt5", "umt5"):
        with folder_load_errors("T5 encoder", path):
            model = transformers.T5EncoderModel.from_pretrained(path, **options)
        return HFTextEncoder(model, tokenizer, max_length or 128, device, pad_to_max_length=bool(pad_to_max_length))
    if kind in ("clip", "clip_text_model"):
        with folder_load_errors("CLIP text model", path):
            model = transformers.CLIPTextModel.from_pretrained(path, **options)
        own = tokenizer.model_max_length  # what diffusers pads to; "unset" is a huge sentinel
        length = max_length or (own if sd_style and own < 10 ** 6 else 77)
        pad = sd_style if pad_to_max_length is None else pad_to_max_length
        return HFTextEncoder(model, tokenizer, length, device, pad_to_max_length=pad, attend_padding=sd_style)
    raise ValueError(f"text encoder in {str(path)!r} has model_type {kind!r}; supported: t5 and clip")


def check_text_encoder_folder(path: str | os.PathLike) -> Path:
    """``path`` as a Path when it is a folder with the config.json of a transformers text encoder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text encoder directory {str(path)!r} has no config.json")
    return path


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


class WordEncoder(torch.nn.Module):
    """A learned embedding per word of a closed vocabulary: the text encoder of small models trained on captions
    of a known language (the demo model's). A prompt is lower-cased and split into words (letters only); a word
    outside the vocabulary raises ``ValueError`` naming it and the vocabulary. Token 0 stands for the empty prompt
    (the unconditional branch of classifier-free guidance). Weights: ``save(dir)`` / ``WordEncoder.load(dir)``
    (``vocab.json`` + ``embedding.safetensors``)."""

    EMPTY = "<empty>"

    def __init__(self, vocab: list[str], dim: int):
        super().__init__()
        words = list(vocab) if isinstance(vocab, (list, tuple)) else []
        lower_case = all(isinstance(w, str) and w.isalpha() and w.islower() for w in words)
        if not words or not lower_case or len(set(words)) != len(words):
            raise ValueError(f"WordEncoder: vocab must be a list of distinct lower-case words, got {shown(vocab)}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"WordEncoder: dim must be a positive integer, got {shown(dim)}")
        check_volume(vocab=len(words) + 1, dim=dim)
        self.vocab = words
        self.index = {w: i + 1 for i, w in enumerate(words)}
        self.dim = dim
        self.embedding = torch.nn.Embedding(len(words) + 1, dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L) long, mask (B, L) bool), padded with token 0 under a False mask."""
        import re

        check_prompts(prompts)
        rows = []
        for p in prompts:
            words = re.findall(r"[a-z]+", p.lower())
            unknown = sorted({w for w in words if w not in self.index})
            if unknown:
                raise ValueError(f"prompt {p!r}: unknown word(s) {', '.join(map(repr, unknown))}; this model's text "
                                 f"encoder knows only: {' '.join(self.vocab)}")
            rows.append([self.index[w] for w in words] or [0])
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row)
            mask[i, :len(row)] = True
        return ids, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        with torch.no_grad():
            return self(ids.to(self.embedding.weight.device)).float(), mask.to(self.embedding.weight.device)

    def save(self, directory: str | os.PathLike) -> None:
        """``vocab.json`` + ``embedding.safetensors`` in ``directory`` (created if missing), atomically."""
        import json

        from safetensors.torch import save

        from ..io import atomic_write_bytes, atomic_write_text, make_folder

        directory = make_folder(directory, "WordEncoder.save")
        atomic_write_text(directory / "vocab.json", json.dumps({"vocab": self.vocab, "dim": self.dim}) + "\n")
        atomic_write_bytes(directory / "embedding.safetensors",
                           save({"embedding": self.embedding.weight.detach().float().cpu().contiguous()}))

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "WordEncoder":
        from ..io import read_json
        from ..model.weights import check_state_dict, load_state_dict

        checked_placement(device)
        directory = Path(directory)
        for name in ("vocab.json", "embedding.safetensors"):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"word encoder directory {str(directory)!r} has no {name}")
        meta = read_json(directory / "vocab.json", "save the encoder again with WordEncoder.save")
        if not (isinstance(meta, dict) and isinstance(meta.get("vocab"), list) and isinstance(meta.get("dim"), int)):
            raise ValueError(f"{str(directory / 'vocab.json')!r} must hold {{\"vocab\": [words], \"dim\": int}}, as "
                             "WordEncoder.save writes it")
        encoder = cls(meta["vocab"], meta["dim"])
        given = load_state_dict(directory / "embedding.safetensors")
        check_state_dict({"embedding": encoder.embedding.weight}, given,
                         f"weights in {str(directory / 'embedding.safetensors')!r} (for the vocab.json beside it)")
        encoder.embedding.weight.data.copy_(given["embedding"])
        return encoder.eval().to(device)
