"""Does a late exit in the first sampler calls do more damage than an early one? (README "beta 0.1 at 3x")

At threshold 0.02 the beta-0.1 3x checkpoint exits at block 11 of 13 in the first calls, where higher
thresholds exit at block 5, and its trajectory ends 12x further from full depth (trajectory.csv) though
exit 11's noise-prediction error along the full-depth trajectory is the smaller (layer_mse.csv). This
samples the same noise (seed 0, samples 0..N-1, DPM-Solver 25, as `bench eval`) and prints:

- on the full-depth trajectory, for the first calls: each chosen exit's MSE against the final exit's
  prediction, and the part of it that is a per-image constant offset (the squared per-image mean of
  g_i - g_N), which the sampler's early data predictions (x - sigma eps) / alpha amplify alike everywhere;
- forced exits: every sample exits at block k for calls [0, c) and runs full depth after; the final
  state's MSE against full depth's, unclamped and clamped to [-1, 1], its mean offset, and the share of
  pixels flipped (clamped values more than 1 apart: a speck, or a stroke lost). The same for the
  thresholds themselves, for comparison.

    python results/mnist_study/late_exits.py CHECKPOINT [--thresholds 0.02,0.025] [--n 200] [--exits 5,11] [--calls 3,9]

Output of `run.sh beta01x3s1`: budget/late_exits_seed1.txt.
"""
import argparse

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel
from bench.setup import build_model, build_schedule, image_geometry
from methods import build_method
from methods.common import exit_predictions

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--thresholds", default="0.02", help="thresholds to sample at, for comparison")
parser.add_argument("--n", type=int, default=200)
parser.add_argument("--exits", default="5,11", help="exit blocks (0-based) to force")
parser.add_argument("--calls", default="3,9", help="force them for calls [0, c), for each c")
args = parser.parse_args()
forced_exits = [int(k) for k in args.exits.split(",")]
forced_calls = [int(c) for c in args.calls.split(",")]

cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"}, {})
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint, prefer="ema", fresh_extras=False)
model.eval()
bb = model.backbone
full_depth = EarlyExitModel(model, method, threshold=None)
# forced exits are the `static` method's (fixed schedule: threshold = exit block) on this checkpoint
static = build_method("static", resolve(load_config(), {"method": "static", "dataset": "mnist", "profile": "study"}, {})["method"])
schedule, s = build_schedule(cfg), cfg["sample"]
sampler = SAMPLERS.get(s["sampler"])
resolution, channels, _ = image_geometry(cfg)
shape = (channels, resolution, resolution)


class Forced:
    """eps_fn: every sample exits at block `k` for calls [0, calls), full depth after. With `record`
    (full depth throughout) it records, for the first `record` calls, every chosen exit's error against
    the final prediction: total MSE and the squared per-image mean (the constant-offset part)."""

    def __init__(self, k: int | None = None, calls: int = 0, record: int = 0):
        self.forced = None if k is None else EarlyExitModel(model, static, threshold=k)
        self.calls, self.record, self.call, self.rows = calls, record, 0, []

    @torch.no_grad()
    def __call__(self, x, model_t):
        call, self.call = self.call, self.call + 1
        if call < self.calls:
            return self.forced(x, model_t)
        if call >= self.record:
            return full_depth(x, model_t)
        out = exit_predictions(model, x, model_t)
        diffs = {k: (out.preds[k] - out.final).float() for k in forced_exits}
        self.rows.append((call, float(model_t.float().mean()),
                          {k: (float((d ** 2).mean()), float((d.mean((1, 2, 3)) ** 2).mean())) for k, d in diffs.items()}))
        return out.final


@torch.no_grad()
def sample(eps_fn):
    return sampler(eps_fn, schedule, NoiseSource(cfg["run"]["seed"], torch.arange(args.n)), shape, s["steps"],
                   **s["options"])


def compare(x, full):
    """Final-state MSE against full depth (unclamped, clamped), the mean per-image offset and the share of
    flipped pixels."""
    clamped = x.clamp(-1, 1) - full.clamp(-1, 1)
    return (float(((x - full) ** 2).mean()), float((clamped ** 2).mean()),
            float((x - full).mean((1, 2, 3)).mean()), float((x - full).mean((1, 2, 3)).abs().mean()),
            float((clamped.abs() > 1).double().mean()))


probe = Forced(record=max(forced_calls))
full = sample(probe)
print(f"{args.checkpoint}\n{args.n} samples, {s['sampler']} {s['steps']} steps, seed {cfg['run']['seed']}")
print(f"full depth: final state outside [-1.05, 1.05]: {float((full.abs() > 1.05).double().mean()):.4f} of pixels")
print("\nalong the full-depth trajectory: exit error against the final prediction, MSE (offset part)")
print(f"{'call':>4} {'t':>6}  " + "  ".join(f"{'exit ' + str(k):>21}" for k in forced_exits))
for call, model_t, errors in probe.rows:
    print(f"{call:4d} {model_t / 1000:6.3f}  " + "  ".join(f"{errors[k][0]:9.6f} ({errors[k][1]:9.6f})" for k in forced_exits))

print("\nfinal state against full depth: MSE unclamped, MSE clamped, mean offset, mean |offset| per image, "
      "share of pixels flipped")
for threshold in [float(v) for v in args.thresholds.split(",")]:
    engine = EarlyExitModel(model, method, threshold=threshold, mode="realised")
    x = sample(engine)
    exits = torch.stack(engine.record.exit_blocks)
    ratio = float((exits + 1).double().mean()) / bb.num_exits
    first = ", ".join(f"{float(exits[c].double().mean()):.1f}" for c in range(max(forced_calls)))
    print(f"threshold {threshold} (ratio {ratio:.3f}; mean exit block of calls 0..{max(forced_calls) - 1}: {first}): "
          + "  ".join(f"{v:9.5f}" for v in compare(x, full)))
for k in forced_exits:
    for c in forced_calls:
        x = sample(Forced(k, c))
        print(f"exit {k:2d} forced for calls [0, {c}), full depth after: " + "  ".join(f"{v:9.5f}" for v in compare(x, full)))
