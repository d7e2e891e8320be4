"""Caption features for text-to-image U-ViT: CLIP's text transformer, last hidden state, 77 tokens.

As U-ViT's ``FrozenCLIPEmbedder`` (libs/clip.py, after latent-diffusion): tokenize with truncation
and padding to ``max_length`` 77, run ``CLIPTextModel``, keep ``last_hidden_state`` (N, 77, 768 for
openai/clip-vit-large-patch14); the features of the empty caption "" are the unconditional context
(scripts/extract_empty_feature.py).

- ``"random:tiny"``: a random CLIPTextModel (hidden 64, 2 layers, 2 heads, 77 positions) from a fixed
  seed, with a CLIP tokenizer built in memory from a character-level vocabulary: the 256 byte-level
  symbols, each also with CLIP's end-of-word mark ``</w>``, and the two special tokens, with no
  merges (so every word becomes its characters). It needs no files and no network; it is NOT CLIP.
- a local directory holding a CLIPTextModel (or a whole CLIP model) and its tokenizer files;
- a hub id, e.g. ``openai/clip-vit-large-patch14`` (what U-ViT uses); it needs the hub.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .autoencoder import RANDOM_PREFIX, SpecError, _fingerprint, hub_error, split_spec

MAX_LENGTH = 77  # CLIP's context length; U-ViT's num_clip_token
TINY_SEED = 20240608
TINY_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                   max_position_embeddings=MAX_LENGTH, projection_dim=64)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def char_level_clip_tokenizer():
    """A CLIPTokenizer over byte-level characters: vocab = 256 symbols + 256 symbols with ``</w>`` + BOS +
    EOS (514 ids; EOS doubles as padding, as in CLIP), no merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": len(symbols) + i for i, s in enumerate(symbols)})
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LENGTH)


def tiny_text_model(vocab_size: int, bos_id: int, eos_id: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=eos_id,
                            pad_token_id=eos_id, **TINY_CONFIG)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(TINY_SEED)
        model = CLIPTextModel(config)
    finally:
        torch.random.set_rng_state(state)
    return model


class TextEncoder:
    """Captions -> float32 (N, 77, D) token features (the last hidden state), batched, no gradients."""

    def __init__(self, model, tokenizer, *, spec: str, label: str, random_init: bool,
                 max_length: int = MAX_LENGTH, batch_size: int = 64):
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.spec, self.label, self.random_init = spec, label, random_init
        self.max_length, self.batch_size = max_length, batch_size
        self._fingerprint: str | None = None

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = _fingerprint(self.model)
        return self._fingerprint

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "TextEncoder":
        self.model.to(*(a for a in (device, dtype) if a is not None))
        return self

    def describe(self) -> dict:
        return {"spec": self.spec, "label": self.label, "random_init": self.random_init, "dim": self.dim,
                "tokens": self.max_length, "fingerprint": self.fingerprint,
                "class": type(self.model).__name__, "tokenizer": type(self.tokenizer).__name__}

    def tokenize(self, captions: list[str]) -> torch.Tensor:
        """(N, 77) token ids: BOS, the caption, EOS, then EOS padding; truncated to 77."""
        enc = self.tokenizer(list(captions), truncation=True, max_length=self.max_length,
                             padding="max_length", return_tensors="pt")
        return enc["input_ids"]

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        """float32 (N, 77, D) on the CPU."""
        if isinstance(captions, str):
            raise TypeError("encode takes a list of captions, not one string")
        out = []
        for i in range(0, len(captions), self.batch_size):
            ids = self.tokenize(captions[i:i + self.batch_size]).to(self.device)
            out.append(self.model(input_ids=ids).last_hidden_state.float().cpu())
        return torch.cat(out) if out else torch.zeros((0, self.max_length, self.dim))

    def __repr__(self) -> str:
        return f"TextEncoder({self.label!r}, dim={self.dim})"


def load_text_encoder(spec: str, *, device: str | torch.device = "cpu", batch_size: int = 64) -> TextEncoder:
    """The text encoder ``spec`` names: "random:tiny", a local directory or a hub id (safetensors only)."""
    kind, where, sub = split_spec(spec)
    if kind == "random":
        if where != "tiny":
            raise SpecError(f"unknown random text encoder {spec!r}; valid: {RANDOM_PREFIX}tiny")
        tokenizer = char_level_clip_tokenizer()
        model = tiny_text_model(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        label = ("random-init CLIPTextModel tiny (hidden 64, 2 layers) with a character-level tokenizer "
                 "(NOT CLIP ViT-L/14)")
    else:
        from transformers import CLIPTextModel, CLIPTokenizer

        kwargs = {"subfolder": sub} if sub else {}
        if kind == "local" and not (Path(where) / "config.json").is_file() and (Path(where) / "text_encoder").is_dir():
            kwargs = {"subfolder": "text_encoder"}  # a whole pipeline folder
        tok_kwargs = {"subfolder": "tokenizer"} if kwargs.get("subfolder") == "text_encoder" else kwargs
        try:
            tokenizer = CLIPTokenizer.from_pretrained(where, **tok_kwargs)
            model = CLIPTextModel.from_pretrained(where, use_safetensors=True, **kwargs)
        except (OSError, EnvironmentError, ValueError) as err:
            if kind == "hub":
                raise hub_error(spec, err) from err
            raise SpecError(f"could not load a CLIP text model and tokenizer from {where!r}: {err} "
                            "(safetensors weights are required)") from err
        label = f"CLIPTextModel {where}{f':{sub}' if sub else ''}"
    return TextEncoder(model, tokenizer, spec=spec, label=label, random_init=kind == "random",
                       batch_size=batch_size).to(device)
