"""The full backbone, trained with L_simple (Ho et al. 2020, eq. 14): ||eps - eps_theta(x_t, t)||^2."""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from methods import METHODS
from methods.base import DiffusionModel, Method


@METHODS.register("baseline", help="the full backbone (no exits), trained with L_simple")
class Baseline(Method):
    """The full model: every sample runs every block."""

    def loss(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        loss = F.mse_loss(model(x_t, model_t, cond), noise)
        return loss, {"loss": loss.item()}
