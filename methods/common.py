"""Helpers shared by the exit methods: every exit's prediction in one pass, per-pixel maps, hparams.

A method sees a backbone only through the exit contract (backbones/contract.py). What an exit module
needs to know about a hidden state it reads from what the contract declares, never from the class:
`exit_layout` (tokens: U-ViT's patch tokens (B, L, D), the same shape at every exit; map: a U-Net
feature map (B, C_i, H_i, W_i)), `first_half_exits`, `exit_info` (width and shape per exit) and
`output_info` (the prediction's channels, size and patch).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.uvit import timestep_embedding, unpatchify

# ---- what the exits hold ------------------------------------------------------------------


def exit_widths(backbone: nn.Module) -> list[int]:
    """Channels of the hidden state at every exit (U-ViT: D everywhere; U-Net: C_i)."""
    return [info.width for info in backbone.exit_info]


def encoder_exits(backbone: nn.Module) -> int:
    """How many exits lie in the first half (U-ViT: the in-blocks; U-Net: the down levels)."""
    return backbone.first_half_exits


# ---- every exit in one pass ---------------------------------------------------------------


class ExitOutputs(NamedTuple):
    preds: list[Tensor]    # g_i(h_i): the noise prediction at exit i, (B, C, H, W) each
    hiddens: list[Tensor]  # h_i: what an exit module reads (backbone.hidden)
    final: Tensor          # preds[-1], the full model's prediction


def exit_predictions(model, x_t: Tensor, model_t: Tensor, cond: Tensor | None = None) -> ExitOutputs:
    """Run the backbone once through the contract and read the head at every exit."""
    bb = model.backbone
    state = bb.prepare(x_t, model_t, cond)
    preds, hiddens = [], []
    for i in range(bb.num_exits):
        state = bb.run_block(i, state)
        hiddens.append(bb.hidden(state))
        preds.append(bb.head(state, i))
    return ExitOutputs(preds, hiddens, preds[-1])


def per_sample_mse(a: Tensor, b: Tensor) -> Tensor:
    """Mean of squares of a - b over everything but the batch: (B, ...) -> (B,), in float32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


def batch_time(model_t: Tensor, batch: int) -> Tensor:
    """The network time input as a (B,) tensor (a scalar serves the whole batch)."""
    return model_t.reshape(1).expand(batch) if model_t.dim() == 0 else model_t


# ---- per-pixel maps from a hidden state ---------------------------------------------------


class PixelMap(nn.Module):
    """A linear map from an exit's hidden state to an image-shaped map (B, C, H, W) of logits.

    U-ViT (tokens (B, L, D)): Linear(D -> p*p*C) per token, then unpatchify (DeeDiff's UEM).
    U-Net (map (B, C_i, H_i, W_i)): 1x1 conv C_i -> C, then nearest interpolation to H x W.
    With time_dim > 0 a sinusoidal embedding of the time input is concatenated to every token or
    pixel (DeeDiff eq. 8, w^T [L_i, t] + b); written as proj(h) + time(emb), which is the same
    linear map without materialising the concatenation.
    """

    def __init__(self, layout: str, width: int, channels: int, size: int, patch_size: int = 1, time_dim: int = 0):
        super().__init__()
        self.tokens = layout == "tokens"  # else a feature map
        self.width, self.channels, self.size = width, channels, size
        self.patch_size, self.time_dim = patch_size, time_dim
        out = patch_size**2 * channels if self.tokens else channels
        self.proj = nn.Linear(width, out) if self.tokens else nn.Conv2d(width, out, kernel_size=1)
        self.time = nn.Linear(time_dim, out, bias=False) if time_dim > 0 else None
        for m in (self.proj, self.time):  # U-ViT's init (trunc normal 0.02, zero bias): maps start at 0
            if m is not None:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, h: Tensor, model_t: Tensor | None = None) -> Tensor:
        """The map's logits, (B, C, H, W)."""
        y = self._logits(h, model_t)  # U-ViT: (B, L, p*p*C); U-Net: (B, C, H_i, W_i)
        if self.tokens:
            return unpatchify(y, self.channels, self.patch_size)  # (B, C, H, W)
        if y.shape[-1] != self.size:
            y = F.interpolate(y, size=(self.size, self.size), mode="nearest")
        return y

    def mean_sigmoid(self, h: Tensor, model_t: Tensor | None = None) -> Tensor:
        """Per-sample mean of sigmoid(map) in float32, (B,): what an exit rule reads (DeeDiff's mean
        uncertainty), at the least cost, because it runs after every block. A mean does not depend on the
        layout, so the tokens are not unpatchified and an integer nearest upsampling (which repeats every
        value equally often) is skipped. Patch tokens (a strided slice of U-ViT's sequence) are read in
        place by one batched product written outputs-major, W h^T + b: (B, p*p*C, L), where a linear layer
        would first copy them; about 2x faster at batch 16-64 on the CPU (results/perf_profile.txt)."""
        if self.tokens and self.time is None and h.dim() == 3:
            weight = self.proj.weight.expand(h.shape[0], -1, -1)                  # (B, p*p*C, D)
            y = torch.baddbmm(self.proj.bias[:, None], weight, h.transpose(1, 2))  # (B, p*p*C, L)
        else:
            y = self._logits(h, model_t)
            if not self.tokens and self.size % y.shape[-1]:
                y = F.interpolate(y, size=(self.size, self.size), mode="nearest")
        return torch.sigmoid_(y.float()).flatten(1).mean(1)

    def _logits(self, h: Tensor, model_t: Tensor | None) -> Tensor:
        y = self.proj(h)
        if self.time is not None:
            emb = timestep_embedding(batch_time(model_t, h.shape[0]), self.time_dim).to(y.dtype)
            y = y + (self.time(emb)[:, None, :] if self.tokens else self.time(emb)[:, :, None, None])
        return y

    def gmacs(self, hidden_shape: tuple[int, ...]) -> float:
        """Multiply-adds of one call for one sample with the given per-sample hidden shape, in G."""
        positions = math.prod(hidden_shape[:-1]) if self.tokens else math.prod(hidden_shape[1:])
        out = self.proj.out_features if self.tokens else self.proj.out_channels
        return (positions * self.width * out + self.time_dim * out) / 1e9


def pixel_map(backbone: nn.Module, width: int, time_dim: int = 0) -> PixelMap:
    """The PixelMap that reads an exit of `backbone` whose hidden state is `width` wide (exit_widths) and
    writes a map of the output's shape."""
    out = backbone.output_info
    return PixelMap(backbone.exit_layout, width, out.channels, out.size,
                    patch_size=out.patch_size if backbone.exit_layout == "tokens" else 1, time_dim=time_dim)


def hidden_shapes(backbone: nn.Module) -> list[tuple[int, ...]]:
    """Per-sample shape of the hidden state at every exit."""
    return [info.hidden_shape for info in backbone.exit_info]


# ---- hyper-parameters ---------------------------------------------------------------------


def resolve_hparams(method: str, given: dict, defaults: dict, choices: dict[str, tuple] | None = None) -> dict:
    """Defaults updated by `given`; unknown names and values outside `choices` raise ValueError."""
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"method {method!r} has no hyper-parameter {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sorted(defaults))}")
    hp = {**defaults, **given}
    for key, valid in (choices or {}).items():
        if hp[key] not in valid:
            raise ValueError(f"method {method!r}: {key}={hp[key]!r} is not one of {valid}")
    return hp
