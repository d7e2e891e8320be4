"""Which samples fail at a threshold past the cliff, and at which sampler calls their exits do the damage.

At threshold 0.06 the 3x-budget DeeDiff checkpoint (`run.sh budget`) turns about one sample in five into
pure noise while the rest stay legible. This samples the same noise (seed 0, samples 0..N-1, DPM-Solver 25,
realised engine, as `bench eval` does) at full depth and at the threshold, and prints:

- which samples failed: an image's total variation (mean |difference| of neighbouring pixels) above the
  largest of the same noise's full-depth images (a digit on black has little; static has much);
- the exit block per sampler call (network evaluation), averaged over failed and over legible samples;
- counterfactuals: the same sampling with full depth forced for one window of calls (the others exit as
  usual), and the number of failed samples each leaves; a window whose full depth rescues the failed
  samples is where their exits do the damage.

    python results/mnist_study/failed_samples.py CHECKPOINT [--threshold 0.06] [--n 200] [--window 5] [--grid PNG] [--probe]

Outputs of `run.sh budget`: failed_samples_thr*.txt in budget/.
"""
import argparse
from pathlib import Path

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel
from bench.sample import save_grid
from bench.setup import build_model, build_schedule, image_geometry
from methods import build_method
from methods.common import exit_predictions

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--threshold", type=float, default=0.06)
parser.add_argument("--n", type=int, default=200)
parser.add_argument("--grid", default=None, help="PNG: each failed sample (top row) above its full-depth image")
parser.add_argument("--probe", action="store_true",
                    help="also: at every third call, what the UEMs say on the failed samples' inputs")
parser.add_argument("--window", type=int, default=5, help="calls forced to full depth at a time (0: no counterfactuals)")
args = parser.parse_args()

cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"}, {})
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint, prefer="ema", fresh_extras=False)
model.eval()
schedule, s = build_schedule(cfg), cfg["sample"]
sampler = SAMPLERS.get(s["sampler"])
resolution, channels, _ = image_geometry(cfg)
shape = (channels, resolution, resolution)
torch.manual_seed(0)


class CallWindow:
    """eps_fn that runs full depth for calls in [lo, hi) and exits at the threshold elsewhere."""

    def __init__(self, engine: EarlyExitModel, threshold: float | None, lo: int = 0, hi: int = 0):
        self.engine, self.threshold, self.lo, self.hi, self.call = engine, threshold, lo, hi, 0
        self.inputs = []  # (x, model_t) of every call, for the probe

    def __call__(self, x, model_t):
        self.inputs.append((x.clone(), model_t))
        self.engine.threshold = None if self.lo <= self.call < self.hi else self.threshold
        self.call += 1
        return self.engine(x, model_t)


@torch.no_grad()
def sample(threshold: float | None, lo: int = 0, hi: int = 0):
    engine = EarlyExitModel(model, method, threshold=threshold, mode="realised")
    eps_fn = CallWindow(engine, threshold, lo, hi)
    x = sampler(eps_fn, schedule, NoiseSource(cfg["run"]["seed"], torch.arange(args.n)), shape, s["steps"],
                **s["options"]).clamp(-1, 1)
    exits = torch.stack(engine.record.exit_blocks) if engine.record.exit_blocks else None  # (calls, N)
    return x, exits, eps_fn.call, eps_fn.inputs


def total_variation(x):
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)))


full, _, calls, _ = sample(None)
limit = float(total_variation(full).max())
x, exits, _, inputs = sample(args.threshold)
tv = total_variation(x)
failed = tv > limit
num_exits = model.backbone.num_exits
print(f"{args.checkpoint}\nthreshold {args.threshold}, {args.n} samples, {s['sampler']} {s['steps']} steps "
      f"({calls} network calls); layer ratio {float((exits + 1).double().mean()) / num_exits:.3f}")
print(f"total variation: full depth median {float(total_variation(full).median()):.3f}, max {limit:.3f}; "
      f"at the threshold median {float(tv.median()):.3f}; failed (above the full-depth max): "
      f"{int(failed.sum())} of {args.n}: samples {failed.nonzero().flatten().tolist()[:40]}")
if args.grid and failed.any():
    shown = failed.nonzero().flatten()[:16]
    save_grid(torch.cat([x[shown], full[shown]]), Path(args.grid), nrow=len(shown))
if failed.any() and (~failed).any():
    print("\nexit block per call (0-based, 12 = the final exit), mean over samples; "
          "share exiting at block <= 3")
    print(f"{'call':>4}  {'failed':>7} {'legible':>7}   {'failed<=3':>9} {'legible<=3':>10}")
    for c in range(len(exits)):
        e = exits[c].double()
        print(f"{c:4d}  {float(e[failed].mean()):7.2f} {float(e[~failed].mean()):7.2f}   "
              f"{float((e[failed] <= 3).double().mean()):9.2f} {float((e[~failed] <= 3).double().mean()):10.2f}")
    print(f"layer ratio: failed {float((exits[:, failed] + 1).double().mean()) / num_exits:.3f}, "
          f"legible {float((exits[:, ~failed] + 1).double().mean()) / num_exits:.3f}")


@torch.no_grad()
def probe(x_c, model_t, exit_index: int):
    """Per sample: the UEM's mean u at an exit, how far that exit's noise prediction is from the final
    exit's (mean tanh|g_i - g_N|, the form of eq. 9's target with the final prediction for eps) and from
    the sampler's input itself (mean |g_i - x|: a prediction of 'it is all noise'), and the input's std."""
    t = model_t.expand(len(x_c)) if model_t.dim() == 0 else model_t
    out = exit_predictions(model, x_c, t)
    u = method.uncertainty(model, exit_index, out.hiddens[exit_index], t).flatten(1).mean(1)
    g = out.preds[exit_index].float()
    to_final = torch.tanh((g - out.final.float()).abs()).flatten(1).mean(1)
    return u, to_final, (g - x_c).abs().flatten(1).mean(1), x_c.flatten(1).std(1)


if args.probe and failed.any() and (~failed).any():
    k = 3  # the exit the trapped samples take (0-based)
    print(f"\nprobe at exit index {k} on the sampler's own inputs at the threshold: failed / legible means")
    print(f"{'call':>4} {'t':>6}  {'u':>13}  {'tanh|g-g_N|':>13}  {'|g-x|':>13}  {'std(x)':>13}")
    for c in range(0, calls, 3):
        x_c, model_t = inputs[c]
        cols = probe(x_c, model_t, k)
        t_value = float(model_t.float().mean()) / 1000
        print(f"{c:4d} {t_value:6.3f}  " + "  ".join(f"{float(v[failed].mean()):6.3f}/{float(v[~failed].mean()):6.3f}"
                                                  for v in cols))

if args.window <= 0:
    raise SystemExit(0)
print(f"\ncounterfactuals: full depth forced for calls [lo, hi), exits elsewhere at {args.threshold}")
print(f"{'calls':>9}  {'layer ratio':>11}  {'failed':>6}  {'of the failed above, still failed':>33}")
for lo in range(0, calls, args.window):
    hi = min(calls, lo + args.window)
    y, e, _, _ = sample(args.threshold, lo, hi)
    bad = total_variation(y) > limit
    print(f"[{lo:2d},{hi:2d})  {float((e + 1).double().mean()) / num_exits:11.3f}  {int(bad.sum()):6d}  "
          f"{int((bad & failed).sum()):33d}")
