"""Class and text conditions: label dropout in training, conditions and the null input in sampling.

U-ViT's conventions (github baofff/U-ViT, datasets.py and the train/sample scripts):
- ImageNet: labels 0..999 and the null label 1000 (so the label embedding has 1001 rows); in
  training the label is replaced by the null label with probability p_uncond (0.15).
- MS-COCO: 77 CLIP token features per caption; the unconditional input is the features of the
  empty caption; p_uncond 0.1.
- Sampling with guidance: eps_c + scale * (eps_c - eps_u) (scale 0.4 ImageNet, 1.0 MS-COCO).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bench.config import ConfigError


@dataclass
class Conditioning:
    """What a conditional dataset gives the model; `null` is the null label () or the empty caption (77, D)."""

    kind: str          # class | text
    null: Tensor
    p_uncond: float
    dataset: str
    path: str | None

    def backbone_kwargs(self) -> dict:
        """Constructor arguments that size the backbone's condition input."""
        if self.kind == "class":
            return {"num_classes": int(self.null) + 1}  # the labels and the null label
        tokens, dim = self.null.shape
        return {"clip_dim": int(dim), "num_clip_token": int(tokens)}

    def training(self, labels: Tensor, generator: torch.Generator, device: torch.device,
                 rows: tuple[int, int] | None = None) -> Tensor:
        """The batch's conditions with label dropout (p_uncond) for classifier-free guidance. `rows`
        (offset, batch size): `labels` are those rows of a larger batch (a data-parallel worker's part),
        and the dropout is drawn for the whole batch, so that it falls where it would in one process."""
        cond = labels.to(device)
        if self.kind == "class":
            cond = cond.long()
        if self.p_uncond <= 0:
            return cond
        offset, total = rows or (0, len(labels))
        drop = (torch.rand(total, generator=generator) < self.p_uncond)[offset:offset + len(labels)].to(device)
        null = self.null.to(device=device, dtype=cond.dtype)
        if self.kind == "class":
            return torch.where(drop, null, cond)
        return torch.where(drop[:, None, None], null.expand_as(cond), cond)

    def exact(self, labels: Tensor, device: torch.device) -> Tensor:
        """The batch's own conditions, without dropout (analyses on training images)."""
        cond = labels.to(device)
        return cond.long() if self.kind == "class" else cond.float()

    def sampling(self, indices: Tensor, seed: int, device: torch.device) -> Tensor:
        """The conditions of generated samples `indices` (labels, or validation captions' features)."""
        from bench.data import sampling_conditions

        conditions = sampling_conditions(self.dataset, self.path, indices, seed)
        cond = conditions["labels"] if self.kind == "class" else conditions["context"]
        return cond.to(device)


def build_conditioning(cfg: dict) -> Conditioning | None:
    """The configured dataset's conditioning (data.condition), or None for an unconditional model."""
    d = cfg["data"]
    if d["condition"] == "none":
        return None
    from bench.data import unconditional

    null = torch.as_tensor(unconditional(d["name"], d["path"]))
    if d["condition"] == "class" and null.dim() != 0:
        raise ConfigError(f"data.condition is class but dataset {d['name']!r} gives a text null input")
    if d["condition"] == "text" and null.dim() != 2:
        raise ConfigError(f"data.condition is text but dataset {d['name']!r} gives no (tokens, dim) empty context")
    return Conditioning(d["condition"], null.float() if d["condition"] == "text" else null.long(), d["p_uncond"],
                        d["name"], d["path"])
