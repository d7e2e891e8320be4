"""DeeDiff: dynamic uncertainty-aware early exiting (Tang et al., "DeeDiff", 2023).

Sections follow the paper: the uncertainty estimation module (UEM, eq. 8), its pseudo target and
loss (eq. 9-10), the uncertainty-aware layer-wise loss (eq. 12), the joint loss (eq. 13), and the
exit rule at inference. Where the paper and its public code (github.com/Tangshengku/AdaDiff,
libs/uvit.py and sde.py) differ, the code's choice is an option; the defaults are stated below.

Notation: u_i in (0, 1) is the uncertainty map of exit i; the official code predicts the
confidence 1 - u_i instead, so its thresholds (CIFAR-10 0.92, CelebA 0.95, ImageNet 0.92,
COCO 0.87 on the mean confidence) are 1 - ours (0.08, 0.05, 0.08, 0.13 on the mean uncertainty).

Hyper-parameters (bench.yaml `methods: deediff:`):

  lambda_u       1.0        lambda of eq. 13 (weight of L_u)
  beta_ual       1.0        beta of eq. 13 (weight of L_UAL)
  layerwise_loss true       false drops L_UAL (paper Table 3, "without UA-loss")
  ual_detach     null       detach (1 - u_i) in eq. 12. null: true for loss_form=paper (the UEM then
                            learns only from its own target, eq. 10; undetached, eq. 12 rewards
                            u_i -> 1 wherever the error is large, and the minimiser of L_u + L_UAL
                            becomes tanh|e| + e^2/2 per pixel: a biased uncertainty), false for
                            loss_form=official (the official weights are not detached)
  loss_form      official   official (default): the code's sde.py: L_u averaged over exits;
                            L_UAL = sum over all exits of w_i * mse_i with w_i = batch-mean
                            confidence of exit i, normalised to sum to 1, so L_UAL is a weighted
                            mean and the final output keeps the largest weight (1 + w_N).
                            paper: eq. 10, 12, 13 as written; L_UAL sums 12 exits, about 10x
                            L_simple when fine-tuning starts, and the shared head then serves the
                            shallow exits at the final output's expense (measured: results/mnist_study/pilots/README.md)
  uem_time       token      token: the UEM reads the hidden state only; time enters through the time
                            token the patch tokens attended to (official code, which produced the
                            published numbers). concat: eq. 8, a sinusoidal time embedding is
                            concatenated to every token / pixel before the linear map
  uem_time_dim   null       width of that embedding (null: the hidden width of the exit)
  shared_uem     false      one UEM for all exits (Table 3 "parameter sharing"). U-ViT: one module.
                            U-Net: one module per channel count (exits whose hidden states have the
                            same channels share), since a 1x1 conv cannot read different widths
  exit_rule      per_sample per_sample: each sample exits on its own mean uncertainty (the official
                            evaluation runs one image at a time, so this is its behaviour);
                            batch_mean: the whole batch exits on the mean over the batch (the code)
  patience       1          in the first half (U-ViT in-blocks, U-Net down levels) an exit needs the
                            threshold crossed patience + 1 times (official: 1); 0 exits at once
  patience_reset false      false: crossings count cumulatively (official: its counter is never
                            reset); true: they must be consecutive
  uem_target     noise      what u_i learns to predict. noise (eq. 9, the paper and the code):
                            tanh|g_i - eps|, the exit's error in the noise it predicts. data (ours,
                            not in the paper): tanh(sigma_t / alpha_t |g_i - eps|) = tanh|x0_i - x0|,
                            the error of the clean image the exit implies (x0_i = (x_t - sigma_t g_i)
                            / alpha_t). At high noise every exit's noise error is small, so eq. 9 lets
                            exits happen where an error in x0 is largest (results/mnist_study/README.md,
                            finding 3); the data target moves them to low noise. Measured there: worse
                            at every layer ratio, so eq. 9 stays the default. final (ours, not in the
                            paper): tanh|g_i - g_N|, how far the exit's prediction is from the final
                            exit's (detached); eq. 9's error includes the final exit's own, which is
                            large at low noise wherever the network is, and exiting cannot lower it.
                            The final exit's own target is then 0, so in the official loss form its
                            L_UAL weight (1 - u_N, normalised) is the largest: the target changes the
                            training weights too, not only the exit signal
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from methods import METHODS
from methods.base import DiffusionModel, Method
from methods.common import (batch_time, encoder_exits, exit_predictions, exit_widths,
                            hidden_shapes, pixel_map, resolve_hparams)

DEFAULTS = dict(lambda_u=1.0, beta_ual=1.0, layerwise_loss=True, ual_detach=None, loss_form="official",
                uem_time="token", uem_time_dim=None, shared_uem=False, exit_rule="per_sample",
                patience=1, patience_reset=False, uem_target="noise")
CHOICES = dict(loss_form=("paper", "official"), uem_time=("token", "concat"),
               exit_rule=("per_sample", "batch_mean"), ual_detach=(None, True, False),
               layerwise_loss=(True, False), shared_uem=(True, False), patience_reset=(True, False),
               uem_target=("noise", "data", "final"))
CROSSINGS = "deediff_crossings"  # ctx key: (B,) count of threshold crossings in the first half


@METHODS.register("deediff", help="DeeDiff: per-exit uncertainty maps (UEM), uncertainty-aware layer-wise loss")
class DeeDiff(Method):
    """Exit after block i once the mean of a sample's uncertainty map u_i is below the threshold."""

    trains_exits = True

    signal = "uncertainty (mean of the UEM map), exit when below"
    threshold_range = (0.0, 1.0)
    default_thresholds = (0.2, 0.15, 0.1, 0.075, 0.05, 0.03, 0.02, 0.01)  # the paper's sweep
    exit_above = False

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        self.hp = resolve_hparams("deediff", self.hparams, DEFAULTS, CHOICES)
        if not isinstance(self.hp["patience"], int) or self.hp["patience"] < 0:
            raise ValueError(f"deediff: patience must be an integer >= 0, got {self.hp['patience']!r}")
        if self.hp["ual_detach"] is None:
            self.hp["ual_detach"] = self.hp["loss_form"] == "paper"

    # ---- the uncertainty estimation module (eq. 8) ---------------------------------------

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        """One UEM per exit, the last included (it serves the loss; the last block always ends)."""
        widths = exit_widths(backbone)

        def build(i: int) -> nn.Module:
            time_dim = 0 if self.hp["uem_time"] == "token" else (self.hp["uem_time_dim"] or widths[i])
            return pixel_map(backbone, widths[i], time_dim)

        if not self.hp["shared_uem"]:
            uems = [build(i) for i in range(backbone.num_exits)]
        else:  # the same module object at every exit of one width (state dict stores it once per exit key)
            by_width: dict[int, nn.Module] = {}
            uems = [by_width.setdefault(w, build(i)) for i, w in enumerate(widths)]
        return nn.ModuleDict({"uem": nn.ModuleList(uems)})

    def uncertainty(self, model: DiffusionModel, i: int, hidden: Tensor, model_t: Tensor) -> Tensor:
        """u_i = sigmoid(UEM_i(h_i)): a (B, C, H, W) map in (0, 1), computed in float32."""
        return torch.sigmoid(model.extras["uem"][i](hidden, model_t).float())

    # ---- training: eq. 9, 10, 12, 13 ------------------------------------------------------

    def loss(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        out = exit_predictions(model, x_t, model_t, cond)
        n, eps = len(out.preds), noise.float()
        t = batch_time(model_t, x_t.shape[0])
        # the UEM reads the detached hidden state: its loss does not shape the backbone (official code)
        u = [self.uncertainty(model, i, h.detach(), t) for i, h in enumerate(out.hiddens)]
        errors = [g.float() - eps for g in out.preds]                      # g_i(h_i) - eps
        u_hat = self.pseudo_targets(errors, model_t, x_t)                  # eq. 9 (or ours), detached
        u_terms = [(ui - uh).pow(2).mean() for ui, uh in zip(u, u_hat)]   # ||u_i - u_hat_i||^2 (mean)

        l_simple = errors[-1].pow(2).mean()
        zero = l_simple.new_zeros(())
        if self.hp["loss_form"] == "paper":
            l_u = sum(u_terms)                                             # eq. 10
            l_ual = zero
            if self.hp["layerwise_loss"]:                                  # eq. 12, exits 1..N-1
                for ui, e in zip(u[:-1], errors[:-1]):
                    w = 1.0 - (ui.detach() if self.hp["ual_detach"] else ui)
                    l_ual = l_ual + (w * e.pow(2)).mean()
        else:  # the official sde.py: mos_lte and mos_layer_wise
            l_u = sum(u_terms) / n
            l_ual = zero
            if self.hp["layerwise_loss"]:
                conf = torch.stack([(1.0 - ui).mean() for ui in u])        # batch-mean confidence
                w = conf / conf.sum()
                w = w.detach() if self.hp["ual_detach"] else w
                l_ual = sum(w[i] * errors[i].pow(2).mean() for i in range(n))
        loss = l_simple + self.hp["lambda_u"] * l_u + self.hp["beta_ual"] * l_ual  # eq. 13
        logs = {"loss": loss.item(), "l_simple": l_simple.item(), "l_u": l_u.item(), "l_ual": l_ual.item()}
        return loss, logs

    def pseudo_targets(self, errors: list[Tensor], model_t: Tensor, x_t: Tensor) -> list[Tensor]:
        """What each u_i learns to predict, per pixel, detached (uem_target), from the exits' errors
        e_i = g_i - eps: eq. 9's tanh|e_i|; tanh(sigma_t / alpha_t |e_i|) = tanh|x0_i - x0| (data);
        tanh|e_i - e_N| = tanh|g_i - g_N| (final)."""
        errors = [e.detach() for e in errors]
        if self.hp["uem_target"] == "final":
            return [torch.tanh((e - errors[-1]).abs()) for e in errors]
        scale = self._target_scale(model_t, x_t)
        return [torch.tanh(e.abs() * scale) for e in errors]

    def _target_scale(self, model_t: Tensor, x_t: Tensor) -> Tensor | float:
        """The factor on |g_i - eps| in the pseudo target: 1 for eq. 9; sigma_t / alpha_t per sample for
        uem_target: data, since x0_i - x0 = -(sigma_t / alpha_t) (g_i - eps) when x_t = alpha_t x0 + sigma_t eps."""
        if self.hp["uem_target"] == "noise":
            return 1.0
        if self.hp["uem_target"] != "data":
            raise ValueError(f"deediff: uem_target {self.hp['uem_target']!r} is not scaled |g_i - eps|")
        if self.diffusion_schedule is None:
            raise RuntimeError("deediff: uem_target 'data' needs the diffusion schedule "
                               "(method.diffusion_schedule), which training sets before the first step")
        # on the CPU, in float64, as training computes alpha_t and sigma_t for x_t (no float64 on some devices)
        schedule = self.diffusion_schedule
        t = schedule.from_model_time(batch_time(model_t, x_t.shape[0]).detach().cpu())
        ratio = (schedule.sigma(t) / schedule.alpha(t)).to(x_t.device, torch.float32)
        return ratio.view(-1, *([1] * (x_t.dim() - 1)))

    # ---- inference ---------------------------------------------------------------------

    def decide(self, model: DiffusionModel, i: int, state: dict, ctx: dict, threshold: float) -> Tensor:
        bb = model.backbone
        # the mean of u_i over the map's values (PixelMap.mean_sigmoid: a few kernels, as this runs after
        # every block); their layout (patches or pixels) does not change it
        score = model.extras["uem"][i].mean_sigmoid(bb.hidden(state), ctx["model_t"])
        below = score < threshold                                          # (B,)
        if self.hp["exit_rule"] == "batch_mean":
            below = (score.mean() < threshold).expand_as(below)
        if self.hp["patience"] == 0 or i >= encoder_exits(bb):
            return below
        count = ctx.get(CROSSINGS) if i > 0 else None
        count = below.long() if count is None else count + below           # crossings so far
        if self.hp["patience_reset"]:
            count = count * below                                          # a miss resets the count
        ctx[CROSSINGS] = count
        return count > self.hp["patience"]

    @torch.no_grad()
    def uncertainty_maps(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor,
                         cond: Tensor | None = None) -> list[Tensor]:
        """u_i for every exit, (B, C, H, W) each, from one full pass (paper Fig. 4)."""
        out = exit_predictions(model, x_t, model_t, cond)
        t = batch_time(model_t, x_t.shape[0])
        return [self.uncertainty(model, i, h, t) for i, h in enumerate(out.hiddens)]

    def decide_gmacs(self, model: DiffusionModel) -> list[float]:
        """GMACs per sample that `decide` adds after block i (the UEM; fvcore's convention: one
        multiply-add = one flop). The last entry is 0: the engine never asks after the last block."""
        shapes, last = hidden_shapes(model.backbone), model.backbone.num_exits - 1
        return [model.extras["uem"][i].gmacs(shapes[i]) if i < last else 0.0 for i in range(last + 1)]

