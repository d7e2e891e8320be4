"""CALM (Schuster et al., "Confident adaptive language modeling", NeurIPS 2022; google-research
t5x/contrib/calm) on a diffusion backbone: the "state propagation" confidence, the layer-weighted
loss, and threshold calibration by Learn-then-Test (Angelopoulos et al. 2021).

- Confidence after exit i: the cosine similarity between the representations of exits i-1 and i,
  per sample, over the flattened tensor; 0 at the first exit. Exit once it exceeds the threshold.
  U-ViT: the hidden states (patch tokens, the same shape at every exit). U-Net: consecutive exits
  have different shapes (channels and resolution), so it compares their noise predictions
  g_{i-1}, g_i instead (both (B, C, H, W)); that runs the light exit head at every exit, a cost
  `decide_gmacs` reports (the engine runs the head again for the samples that stop).
- Loss: sum_{i=1..N} (i / sum_j j) * mse(g_i, eps): deeper exits weigh more.
- Calibration: `calibrate_threshold` below.

Hyper-parameters (bench.yaml `methods: calm:`):

  compare   auto   hidden | prediction | auto (U-ViT: hidden; U-Net: prediction, the only choice)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import Tensor, nn

from methods import METHODS
from methods.base import DiffusionModel, Method
from methods.common import exit_predictions, hidden_shapes, per_sample_mse, resolve_hparams

DEFAULTS = dict(compare="auto")
CHOICES = dict(compare=("auto", "hidden", "prediction"))
PREVIOUS = "calm_previous"  # ctx key: (B, ...) representation of the previous exit (a view, not a copy)
PREVIOUS_NORM = "calm_previous_norm"  # ctx key: (B,) its L2 norm over the sample, computed once
COSINE_EPS = 1e-8  # F.cosine_similarity's: each norm is clamped to at least this


@METHODS.register("calm", help="CALM: exit when consecutive exits agree (cosine), layer-weighted loss, LTT")
class CALM(Method):
    """Exit after block i once cos(rep_{i-1}, rep_i) exceeds the threshold."""

    trains_exits = True

    signal = "cosine similarity of consecutive exits, exit when above"
    threshold_range = (0.0, 1.0)
    default_thresholds = (0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8)
    exit_above = True

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        self.hp = resolve_hparams("calm", self.hparams, DEFAULTS, CHOICES)

    def compare(self, backbone: nn.Module) -> str:
        """What consecutive exits are compared on: 'hidden' or 'prediction'."""
        tokens, choice = backbone.exit_layout == "tokens", self.hp["compare"]
        if choice == "auto":
            return "hidden" if tokens else "prediction"
        if choice == "hidden" and not tokens:
            raise ValueError("calm: compare=hidden is impossible on the U-Net (consecutive exits have "
                             "different shapes); use compare=prediction or auto")
        return choice

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        self.compare(backbone)  # fail early on an impossible choice
        return nn.ModuleDict()

    def loss(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        out = exit_predictions(model, x_t, model_t, cond)
        n = len(out.preds)
        total = n * (n + 1) / 2
        loss = sum(((i + 1) / total) * per_sample_mse(g, noise).mean() for i, g in enumerate(out.preds))
        return loss, {"loss": loss.item(), "l_simple": per_sample_mse(out.final, noise).mean().item()}

    def decide(self, model: DiffusionModel, i: int, state: dict, ctx: dict, threshold: float) -> Tensor:
        bb = model.backbone
        rep = bb.hidden(state) if self.compare(bb) == "hidden" else bb.head(state, i)
        rep = rep.float()  # (B, ...); float32 already: no copy. The hidden state is a strided view, read in place
        dims = tuple(range(1, rep.dim()))
        norm = torch.linalg.vector_norm(rep, dim=dims).clamp_min(COSINE_EPS)
        previous = ctx.get(PREVIOUS)
        if i == 0 or previous is None:
            similarity = rep.new_zeros(rep.shape[0])  # no previous exit: confidence 0
        else:
            # F.cosine_similarity over the whole sample, with each norm computed once (the previous
            # block's is kept); clamped: rounding can put the cosine of near-equal vectors just above 1,
            # and threshold 1.0 must mean "never exit"
            dot = (rep * previous).sum(dims)
            similarity = (dot / (norm * ctx[PREVIOUS_NORM])).clamp(-1.0, 1.0)
        ctx[PREVIOUS], ctx[PREVIOUS_NORM] = rep, norm
        return similarity > threshold

    def decide_gmacs(self, model: DiffusionModel) -> list[float]:
        """GMACs per sample that `decide` adds after block i: the cosine (2 F multiply-adds: the dot
        product and this exit's norm; the previous exit's norm is kept), plus the exit head on the U-Net
        (from backbone.flops_per_part, fvcore); last entry 0."""
        bb = model.backbone
        last = bb.num_exits - 1
        if self.compare(bb) == "hidden":
            sizes = [math.prod(shape) for shape in hidden_shapes(bb)]
            return [2 * sizes[i] / 1e9 if i < last else 0.0 for i in range(last + 1)]
        flops = bb.flops_per_part()
        out = bb.output_info
        pixels = out.channels * out.size**2
        return [flops[f"head_{i}"] + 2 * pixels / 1e9 if i < last else 0.0 for i in range(last + 1)]


# ------------------------------------------------------------------------------------------------
# Learn-then-Test calibration (Angelopoulos, Bates, Candes, Jordan, Lei 2021; CALM section 4)
#
# Three distinct quantities:
#   sample_tolerance (tau): a sample is inconsistent when the distance between its early-exit
#       prediction and the full model's exceeds tau. Distance: the relative squared error of the
#       noise prediction, ||eps_early - eps_full||^2 / ||eps_full||^2, per sample and network call.
#   risk_tolerance (delta): the bound on the risk R(lambda) = P(inconsistent) the user accepts.
#   epsilon: the level; with probability >= 1 - epsilon over the calibration set, the returned
#       threshold has R <= delta (for calibration and test calls drawn from the same distribution).
# For each candidate lambda_j, in order from strict (few exits) to loose, H_j: R(lambda_j) > delta
# has the Hoeffding p-value p_j = exp(-2 n max(0, delta - R_hat_j)^2) (the loss is 0/1, bounded).
# Fixed-sequence testing rejects H_1, H_2, ... while p_j <= epsilon and stops at the first candidate
# it cannot reject; every rejected candidate is certified, and the loosest of them is returned.
# ------------------------------------------------------------------------------------------------


def relative_error(early: Tensor, full: Tensor) -> Tensor:
    """||early - full||^2 / ||full||^2 per sample, (B, ...) -> (B,), float64."""
    e, f = early.double().flatten(1), full.double().flatten(1)
    return (e - f).pow(2).sum(1) / f.pow(2).sum(1).clamp_min(1e-30)


def hoeffding_p_value(risk_hat: float, n: int, risk_tolerance: float) -> float:
    """p-value of H: R > risk_tolerance, from the empirical risk of n i.i.d. 0/1 losses."""
    return math.exp(-2.0 * n * max(0.0, risk_tolerance - risk_hat) ** 2)


def fixed_sequence_test(risks: Sequence[float], n: int, risk_tolerance: float, epsilon: float) -> tuple[int, list[float]]:
    """Index of the last candidate rejected in order before the first failure (-1: none), and the p-values."""
    p_values, last_valid = [], -1
    for j, risk in enumerate(risks):
        p_values.append(hoeffding_p_value(risk, n, risk_tolerance))
        if p_values[-1] > epsilon:
            break
        last_valid = j
    return last_valid, p_values


@dataclass
class Calibration:
    """The result of `calibrate_threshold`."""

    threshold: float | None          # the loosest certified threshold; None: not even the strictest
    n: int                           # calibration samples (network calls of one sample each)
    risk_tolerance: float
    sample_tolerance: float
    epsilon: float
    table: list[dict] = field(default_factory=list)  # threshold, risk, p_value, valid, layer_ratio


def _unpack(batch) -> tuple[Tensor, Tensor, Tensor | None]:
    if isinstance(batch, dict):
        return batch["x_t"], batch["model_t"], batch.get("cond")
    x_t, model_t, *rest = batch
    return x_t, model_t, (rest[0] if rest else None)


@torch.no_grad()
def calibrate_threshold(model: DiffusionModel, method: Method, batches: Iterable, candidates: Sequence[float], *,
                        risk_tolerance: float = 0.1, sample_tolerance: float = 0.01, epsilon: float = 0.05,
                        mode: str = "realised", evaluate_all: bool = False) -> Calibration:
    """Learn-then-Test: the loosest threshold whose inconsistency risk is certified <= risk_tolerance.

    batches: (x_t, model_t) or (x_t, model_t, cond) tuples (or dicts with those keys), the
    calibration network inputs, e.g. noised data at random times or states along sampling
    trajectories; every sample counts once. candidates: thresholds from strict to loose (for CALM
    decreasing, for DeeDiff and BERxiT increasing). Early-exit predictions come from the engine
    (bench.engine.EarlyExitModel, `mode`); the full model's from the same engine with no threshold.
    The model is put in eval mode. Candidates after the first failure are evaluated only with
    evaluate_all (they stay invalid: fixed-sequence testing has stopped).
    """
    from bench.engine import EarlyExitModel

    if not 0 < epsilon < 1 or not 0 <= risk_tolerance <= 1 or sample_tolerance < 0:
        raise ValueError("need 0 < epsilon < 1, 0 <= risk_tolerance <= 1 and sample_tolerance >= 0")
    model.eval()
    inputs = [_unpack(b) for b in batches]
    full = [EarlyExitModel(model, method, None, cond=c).predict(x, t) for x, t, c in inputs]
    n = sum(len(f) for f in full)
    if n == 0:
        raise ValueError("no calibration samples")
    table, stopped, threshold = [], False, None
    for lam in candidates:
        if stopped and not evaluate_all:
            break
        bad, used = 0, 0.0
        for (x, t, c), ref in zip(inputs, full):
            engine = EarlyExitModel(model, method, float(lam), mode=mode, cond=c)
            bad += int((relative_error(engine.predict(x, t), ref) > sample_tolerance).sum())
            used += float((engine.record.exit_blocks[-1].double() + 1).sum())
        risk = bad / n
        p = hoeffding_p_value(risk, n, risk_tolerance)
        valid = not stopped and p <= epsilon
        stopped = stopped or not valid
        if valid:
            threshold = float(lam)
        table.append({"threshold": float(lam), "risk": risk, "p_value": p, "valid": valid,
                      "layer_ratio": used / (n * model.backbone.num_exits)})
    return Calibration(threshold, n, risk_tolerance, sample_tolerance, epsilon, table)
