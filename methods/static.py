"""Static early exit: a fixed exit block, or a time-dependent number of blocks (Moon et al. 2023).

Two schedules, chosen with the hparam `schedule`:

- `fixed`: every sample stops after the same block, at every sampling step (the paper's static
  exits, Table 5: "layers 7, 9, 11" of U-ViT-S's 13).
- `time`: the number of blocks run depends on the network time, fewer at noisier steps, after
  Moon et al., "Early exiting for accelerated inference in diffusion models"
  (https://github.com/taehong-moon/ee-diffusion, DiT/drop_scheduler.py).

Conventions (the harness's, stated once):

- Exits are 0-based block indices. The paper's "layer L" (1-based) is exit L - 1: layer 7 = exit 6,
  layer 9 = exit 8, layer 11 = exit 10 on a 13-block U-ViT. Exit e means blocks 0..e ran.
- The time buckets are Moon's: 10 buckets of 100 steps of network time, [0, 100), ..., [900, 1000).
  Every schedule of the harness feeds the network a time in [0, 1000) (U-ViT's VP-SDE: 999 t;
  DDIM: the step index n), so the bucket is floor(model_t / 100), clamped to 0..9.
- Moon's schedule for DiT-XL/2 keeps 28, 28, 24, 24, 20, 20, 16, 16, 12, 12 of 28 blocks from t = 0
  to 1000, i.e. drops the fractions f = 0, 0, 1/7, 1/7, 2/7, 2/7, 3/7, 3/7, 4/7, 4/7. For a backbone
  with N blocks we keep n(bucket) = max(1, floor(N (1 - s f) + 1/2)) blocks (round half up; never
  fewer than one block), where s is the schedule's scale. At s = 1 a 13-block U-ViT keeps
  13, 13, 11, 11, 9, 9, 7, 7, 6, 6 blocks (exactly the paper's static layers 11, 9, 7 in the middle
  buckets) and the 7-exit DDIM U-Nets keep 7, 7, 6, 6, 5, 5, 4, 4, 3, 3. The head always runs.

Whose weights (hparam `weights`): `deediff` evaluates the DeeDiff checkpoint trained with the same
settings with a forced exit (the paper's Table 5 compares static and dynamic exits of one model);
`own` trains a static model with the objective below (Moon et al. train for their schedule). null
(default): `deediff` for the fixed schedule, `own` for the time schedule.

What `threshold` means (the sweep is over it):

- `fixed`: the exit block index (0-based; rounded to an integer, clamped to 0..N-1, so a value
  at or beyond the last block is the full model). Default sweep: the Table-5 layers 7, 9, 11
  scaled to the backbone, round_half_up(N L / 13) - 1 -> (6, 8, 10) for 13 blocks, (3, 4, 5) for 7.
- `time`: the scale s of the dropped fraction (0 = full model, 1 = Moon's schedule, 1.75 = one
  block in the noisiest buckets). Default sweep (0.5, 1.0, 1.5).
`threshold=None` runs the full model, as for every method.

Training objective with `weights: own` (our choice, documented): DeeDiff's layer-wise objective without uncertainty,
restricted to the exits this schedule uses,

    L = L_simple + mean_{i in E} ||g_i(L_i) - eps||^2                      (fixed)
    L = L_simple + mean_b [e_b < N - 1] ||g_{e_b}(L_{e_b}) - eps_b||^2     (time)

with E the trained exit blocks (hparam `exit_block`, default the Table-5 blocks above) and e_b the
exit that sample b's time bucket gets at the trained scale (hparam `train_scale`, default 1).
Why not Moon's loss alone (only the scheduled exit's output is trained): keeping L_simple keeps
the full model usable (threshold None, and the later buckets of the schedule), which is how the
paper's baselines are fine-tuned from the full U-ViT; training all swept exits of the fixed schedule
at once lets one checkpoint serve the whole sweep over exit blocks, as a threshold sweep does for
the dynamic methods. Exits outside E (fixed) or outside the trained schedule (time, s != train_scale)
are still usable but not trained: on U-ViT they share the trained head, on the DDIM U-Net their
per-exit heads are untrained.

Difference from Moon et al. on U-ViT: they keep the skip_linear layers of the decoder blocks they
drop; our engine, like DeeDiff's code, stops outright at the exit: an exit in the first half never
runs an out-block, and an exit at out-block k drops the remaining out-blocks with their skip_linear.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backbones.contract import select_state
from methods import METHODS
from methods.base import DiffusionModel, Method
from methods.common import resolve_hparams

# Moon et al.'s DiT-XL/2 schedule: blocks kept of 28 per 100-step bucket, t = 0 -> 1000
MOON_DIT_XL_BLOCKS = (28, 28, 24, 24, 20, 20, 16, 16, 12, 12)
MOON_DIT_XL_DEPTH = 28
BUCKET_WIDTH = 100  # network-time steps per bucket
PAPER_STATIC_LAYERS = (7, 9, 11)  # Table 5, 1-based layers of U-ViT-S's 13 blocks
PAPER_DEPTH = 13
SCHEDULES = ("fixed", "time")
DEFAULTS = {"schedule": "fixed", "exit_block": None, "train_scale": 1.0, "weights": None}
WEIGHTS = (None, "own", "deediff")


def round_half_up(x: float) -> int:
    """floor(x + 1/2), with a little slack so that a float just below k + 1/2 by rounding error goes up."""
    return int(math.floor(x + 0.5 + 1e-9))


def dropped_fraction() -> Tensor:
    """Moon's fraction of blocks dropped per bucket: 0, 0, 1/7, 1/7, ..., 4/7 (float64, (10,))."""
    kept = torch.tensor(MOON_DIT_XL_BLOCKS, dtype=torch.float64)
    return 1.0 - kept / MOON_DIT_XL_DEPTH


def blocks_per_bucket(num_blocks: int, scale: float = 1.0) -> list[int]:
    """Blocks to run in each of the 10 time buckets: max(1, round_half_up(N (1 - scale f)))."""
    if scale < 0:
        raise ValueError(f"the time-schedule scale must be >= 0, got {scale}")
    return [max(1, min(num_blocks, round_half_up(num_blocks * (1.0 - scale * f))))
            for f in dropped_fraction().tolist()]


def time_bucket(model_t: Tensor) -> Tensor:
    """Moon's bucket of each network time: floor(t / 100) in 0..9 (long, same shape)."""
    n = len(MOON_DIT_XL_BLOCKS)
    return torch.div(model_t.float(), BUCKET_WIDTH, rounding_mode="floor").long().clamp(0, n - 1)


def scheduled_exit(model_t: Tensor, num_blocks: int, scale: float = 1.0) -> Tensor:
    """The exit block (0-based) of each sample under the time schedule: blocks_per_bucket - 1."""
    table = torch.tensor(blocks_per_bucket(num_blocks, scale), dtype=torch.long, device=model_t.device)
    return table[time_bucket(model_t)] - 1


def paper_static_exits(num_blocks: int) -> tuple[int, ...]:
    """Table 5's layers 7, 9, 11 of 13 scaled to the backbone, as 0-based exit blocks."""
    return tuple(sorted({max(0, min(num_blocks - 1, round_half_up(num_blocks * layer / PAPER_DEPTH) - 1))
                         for layer in PAPER_STATIC_LAYERS}))


@METHODS.register("static", help="static exit: a fixed 0-based exit block (threshold = block), or Moon et al.'s "
                                 "time schedule (schedule: time; threshold = scale of the dropped fraction)")
class StaticExit(Method):
    """Exit where a schedule says, the same for every sample (fixed) or per time bucket (time)."""

    trains_exits = True

    signal = "exit_block"
    threshold_range = (0.0, 12.0)        # exit blocks of a 13-block U-ViT; set from the backbone in attach
    default_thresholds = (6.0, 8.0, 10.0)  # the paper's layers 7, 9, 11 (Table 5)

    def __init__(self, hparams: dict | None = None):
        super().__init__(hparams)
        hp = resolve_hparams("static", self.hparams, DEFAULTS, {"schedule": SCHEDULES, "weights": WEIGHTS})
        self.schedule = hp["schedule"]
        weights = hp["weights"] or ("deediff" if self.schedule == "fixed" else "own")
        self.weights_from = None if weights == "own" else weights
        self.train_scale = float(hp["train_scale"])
        blocks = hp["exit_block"]
        self._exit_blocks = None if blocks is None else tuple(int(b) for b in (
            blocks if isinstance(blocks, (list, tuple)) else [blocks]))
        if self.schedule == "time":
            self.signal = "time_schedule_scale"
            self.threshold_range = (0.0, 1.75)
            self.default_thresholds = (0.5, 1.0, 1.5)
        self.num_blocks: int | None = None

    @property
    def range_pending(self) -> bool:
        """Whether threshold_range still awaits the backbone (the fixed schedule's exit blocks)."""
        return self.schedule == "fixed" and self.num_blocks is None

    def row_options(self) -> dict:
        return {"weights": self.weights_from or "own"}

    def attach(self, backbone: nn.Module) -> nn.ModuleDict:
        """Nothing to add; remembers the depth and sets the sweep for this backbone."""
        self.num_blocks = backbone.num_exits
        if self.schedule == "fixed":
            self.threshold_range = (0.0, float(self.num_blocks - 1))
            self.default_thresholds = tuple(float(e) for e in self.trained_exits(self.num_blocks))
        return nn.ModuleDict()

    def trained_exits(self, num_blocks: int) -> tuple[int, ...]:
        """The exit blocks trained by the fixed schedule (clamped to the backbone)."""
        blocks = self._exit_blocks if self._exit_blocks is not None else paper_static_exits(num_blocks)
        return tuple(sorted({max(0, min(num_blocks - 1, b)) for b in blocks}))

    # ---- training -------------------------------------------------------------------------

    def loss(self, model: DiffusionModel, x_t: Tensor, model_t: Tensor, noise: Tensor,
             cond: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        bb = model.backbone
        last = bb.num_exits - 1
        if self.schedule == "fixed":
            wanted = [e for e in self.trained_exits(bb.num_exits) if e < last]
            per_sample = None
        else:
            per_sample = scheduled_exit(model_t, bb.num_exits, self.train_scale)
            wanted = sorted(e for e in per_sample.unique().tolist() if e < last)

        state = bb.prepare(x_t, model_t, cond)
        exit_sq = x_t.new_zeros(())  # sum of the exit losses (fixed: over exits; time: over samples)
        logs: dict[str, float] = {}
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            if i not in wanted:
                continue
            if per_sample is None:
                mse = F.mse_loss(bb.head(state, i), noise)
                exit_sq = exit_sq + mse
                logs[f"mse_exit_{i}"] = mse.item()
            else:
                rows = per_sample == i
                pred = bb.head(select_state(state, rows), i)
                exit_sq = exit_sq + (pred.float() - noise[rows].float()).pow(2).flatten(1).mean(1).sum()
        simple = F.mse_loss(bb.head(state, last), noise)
        if per_sample is None:
            exit_term = exit_sq / max(1, len(wanted))
        else:
            exit_term = exit_sq / x_t.shape[0]
        loss = simple + exit_term
        logs.update(loss=loss.item(), l_simple=simple.item(), l_exit=float(exit_term.detach()))
        return loss, logs

    # ---- inference ------------------------------------------------------------------------

    def decide(self, model: DiffusionModel, i: int, state: dict, ctx: dict, threshold: float) -> Tensor | None:
        model_t = ctx["model_t"]
        n = model.backbone.num_exits
        batch = model.backbone.hidden(state).shape[0]
        if self.schedule == "fixed":
            exit_block = max(0, min(n - 1, round_half_up(float(threshold))))
            if i != exit_block:
                return None
            return torch.ones(batch, dtype=torch.bool, device=model_t.device)
        if model_t.dim() == 0:
            model_t = model_t.expand(batch)
        return scheduled_exit(model_t, n, float(threshold)) <= i
