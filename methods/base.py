"""The method plugin interface (DESIGN.md): attach, loss, decide."""
from __future__ import annotations

from torch import Tensor, nn


class Method:
    """Base of every method plugin. Subclasses register themselves in methods.METHODS."""

    def __init__(self, hparams: dict | None = None):
        self.hparams = dict(hparams or {})

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        """The modules this method adds to the backbone (none by default)."""
        return nn.ModuleDict()

    def loss(self, model: "DiffusionModel", x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        """The training objective for one batch; returns the loss and numbers to log."""
        raise NotImplementedError

    def decide(self, i: int, state: dict, model_t: Tensor, threshold: float) -> Tensor | None:
        """Per sample, whether to stop after block i (None: this method never exits early)."""
        return None


class DiffusionModel(nn.Module):
    """A backbone plus the modules a method attached to it; what training saves and loads."""

    def __init__(self, backbone: nn.Module, extras: nn.ModuleDict | None = None):
        super().__init__()
        self.backbone = backbone
        self.extras = extras if extras is not None else nn.ModuleDict()

    def forward(self, x: Tensor, model_t: Tensor, cond: Tensor | None = None) -> Tensor:
        return self.backbone(x, model_t, cond)
