"""BERxiT (Xin et al., EACL 2021, github.com/castorini/berxit) on a diffusion backbone, as DeeDiff
re-implements it: one learning-to-exit (LTE) module shared by all exits, and the averaged
layer-wise loss.

- LTE: p_i = sigmoid(w^T pool(h_i) + b), one module for every exit, reading the mean-pooled hidden
  state of exit i (U-ViT: mean over the patch tokens, (B, D)). The U-Net's exits have different
  channel counts, so each exit first projects its pooled (B, C_i) to a common width with its own
  Linear(C_i -> proj_dim); only the last Linear(proj_dim -> 1) is shared. Two linear maps in a row
  are one linear map, so on the U-Net the LTE is in effect a per-exit linear predictor whose last
  factor is shared; the sharing is what BERxiT's idea allows there, nothing more.
- Target (BERxiT's regression form): tanh(mean over pixels |g_i(h_i) - eps|) per sample, detached.
- Loss: (1/N) sum_i mse(g_i, eps) (the DeeDiff paper's version: averaged layer-wise loss; BERxiT's
  own alternating schedule is not used) + lte_weight * (1/N) sum_i mean_b (p_i - target_i)^2.
- Inference: exit at the first exit whose p_i is below the threshold.

Hyper-parameters (bench.yaml `methods: bertxit:`):

  lte_weight    1.0    weight of the LTE's MSE loss
  detach_input  true   the LTE reads the detached hidden state, so its loss does not shape the
                       backbone (as DeeDiff's UEM); false lets it
  proj_dim      null   U-Net only: the common width of the per-exit projections (null: the widest
                       exit's channels)
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from methods import METHODS
from methods.base import DiffusionModel, Method
from methods.common import exit_predictions, exit_widths, per_sample_mse, resolve_hparams

DEFAULTS = dict(lte_weight=1.0, detach_input=True, proj_dim=None)
CHOICES = dict(detach_input=(True, False))


@METHODS.register("bertxit", help="BERxiT: one shared learning-to-exit module, averaged layer-wise loss")
class BERxiT(Method):
    """Exit after block i once the shared LTE predicts an error (tanh of mean |g_i - eps|) below the threshold."""

    trains_exits = True

    signal = "predicted error tanh(mean |g_i - eps|), exit when below"
    threshold_range = (0.0, 1.0)
    default_thresholds = (0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.05)
    exit_above = False

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        self.hp = resolve_hparams("bertxit", self.hparams, DEFAULTS, CHOICES)

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        widths = exit_widths(backbone)
        if backbone.exit_layout == "tokens":  # the same width at every exit: one LTE reads them all
            return nn.ModuleDict({"lte": nn.Linear(widths[0], 1)})
        dim = self.hp["proj_dim"] or max(widths)
        return nn.ModuleDict({"proj": nn.ModuleList(nn.Linear(w, dim) for w in widths), "lte": nn.Linear(dim, 1)})

    def exit_score(self, model: DiffusionModel, i: int, hidden: Tensor) -> Tensor:
        """p_i: the LTE's predicted error of exit i, (B,) in (0, 1), float32."""
        if self.hp["detach_input"]:
            hidden = hidden.detach()
        if "proj" in model.extras:  # U-Net feature map (B, C_i, H_i, W_i)
            pooled = model.extras["proj"][i](hidden.mean(dim=(2, 3)))
        else:  # U-ViT patch tokens (B, L, D)
            pooled = hidden.mean(dim=1)
        return torch.sigmoid(model.extras["lte"](pooled).float()).squeeze(-1)

    def loss(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        out = exit_predictions(model, x_t, model_t, cond)
        n = len(out.preds)
        layer = sum(per_sample_mse(g, noise).mean() for g in out.preds) / n
        lte = 0.0
        for i, (g, h) in enumerate(zip(out.preds, out.hiddens)):
            target = torch.tanh((g.float() - noise.float()).abs().flatten(1).mean(1)).detach()  # (B,)
            lte = lte + (self.exit_score(model, i, h) - target).pow(2).mean()
        lte = lte / n
        loss = layer + self.hp["lte_weight"] * lte
        return loss, {"loss": loss.item(), "l_layer": layer.item(), "l_lte": lte.item(),
                      "l_simple": per_sample_mse(out.final, noise).mean().item()}

    def decide(self, model: DiffusionModel, i: int, state: dict, ctx: dict, threshold: float) -> Tensor:
        return self.exit_score(model, i, model.backbone.hidden(state)) < threshold

    def decide_gmacs(self, model: DiffusionModel) -> list[float]:
        """GMACs per sample that `decide` adds after block i (pooling adds, projection, LTE); last: 0."""
        widths, last = exit_widths(model.backbone), model.backbone.num_exits - 1
        lte_in = model.extras["lte"].in_features
        per = [(w * lte_in if "proj" in model.extras else 0) + lte_in for w in widths]
        return [p / 1e9 if i < last else 0.0 for i, p in enumerate(per)]
