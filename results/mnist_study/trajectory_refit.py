"""UEMs calibrated on the sampler's own inputs: does that close the trap? (ours, not the paper's)

"The cliff is a trap" (README) measured that past threshold 0.055 the 3x-budget DeeDiff checkpoint sends
a growing share of samples off the data: they exit at the third or fourth block at every call and end as
static, and on those trajectories exit 3's UEM grows *more* certain as t falls while its prediction moves
away from the final exit's. The UEMs were only ever trained on x_t = alpha_t x0 + sigma_t eps of training
digits; a trapped trajectory (std 1.2 at t = 0.4) is an input they never saw.

This refits the UEMs alone, on the frozen backbone, in two arms with the same target, steps and optimizer,
that differ only in their inputs:

- `data`: training digits noised as in training (the control);
- `sampled`: half of each batch from the same data, half from a pool of the sampler's own inputs (every
  network call of DPM-Solver 25 from fresh noise, seed 1, sampled with early exit at thresholds 0.05 to
  0.1 by the UEMs being refitted); the pool is sampled again halfway (a second round), so that it holds
  the trajectories the refitted UEMs lead to.

The target is tanh|g_i - g_N| (`uem_target: final`): a sampler input has no true eps, and the final
exit's prediction stands in for it (on training inputs the two targets differ little, README "The
distance to the final exit's prediction"). Each arm is then measured as `bench eval` measures a cell
(`bench.sample.generate`: seed 0, 1,000 samples, batch 100, realised engine; FID and KID against the
same reference statistics; GMACs per call by fvcore with the UEMs' cost): first a scan of layer ratio
and failed samples on the first 200 samples over a grid of thresholds, then FID at the thresholds whose
scan ratio is nearest 0.8, 0.7 and 0.6. A sample failed when its total variation is above the largest
of the same noise's full-depth images (as in failed_samples.py). The checkpoint's own UEMs are measured
alike at 0.06 (the cell's FID is 103.72), which checks this script against `bench eval`.

    python results/mnist_study/trajectory_refit.py CHECKPOINT [--steps 500] [--csv CSV] [--grid-dir DIR]

Output of `run.sh budget`: budget/trajectory_refit.txt and budget/trajectory_refit.csv. Not cells of
runs.csv: the refitted UEMs are not a configuration of the harness (yet).
"""
import argparse
import copy
import csv
import sys
import time
from pathlib import Path

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.data import dataset_checksum
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel
from bench.evaluate import fid_kid
from bench.evaluate.measure import _reference
from bench.sample import gflops_per_call, generate, save_grid
from bench.setup import build_model, build_schedule, build_train_dataset, image_geometry, prepare_data
from methods import build_method
from methods.common import batch_time, exit_predictions

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--steps", type=int, default=500, help="refit steps per arm (batch 64)")
parser.add_argument("--pool", type=int, default=256, help="sampled trajectories per round")
parser.add_argument("--scan", default="0.01,0.015,0.02,0.03,0.04,0.05,0.06,0.08,0.1")
parser.add_argument("--n", type=int, default=1000, help="samples of the FID cells")
parser.add_argument("--csv", default=None, help="write the measured rows here")
parser.add_argument("--grid-dir", default=None, help="a PNG grid of the first 64 samples of each FID cell")
args = parser.parse_args()

MNIST = "../shared/data/mnist-png.zip"
cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"},
              {"data.path": MNIST, "methods.deediff.uem_target": "final"})
prepare_data(cfg)
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint, prefer="ema", fresh_extras=False)
model.eval().requires_grad_(False)
original_uems = copy.deepcopy(model.extras.state_dict())
schedule, s, t_cfg = build_schedule(cfg), cfg["sample"], cfg["train"]
resolution, channels, _ = image_geometry(cfg)
shape = (channels, resolution, resolution)
device = torch.device("cpu")
num_exits = model.backbone.num_exits
flops = model.backbone.flops_per_part()
reference = _reference(cfg, device, progress=False)
checksum = dataset_checksum("mnist", MNIST, cfg["data"]["split"])


def say(*line):
    print(*line, flush=True)


# ---- the refit ---------------------------------------------------------------------------------------

def data_batches(seed: int):
    """Training digits noised as in training (bench/train.py), forever."""
    dataset = build_train_dataset(cfg)
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=gen)
        for lo in range(0, len(order) - 32 + 1, 32):
            x0 = torch.stack([dataset[int(i)][0] for i in order[lo:lo + 32]])
            t = schedule.sample_train_time(32, generator=gen)
            yield schedule.add_noise(x0, t, torch.randn(x0.shape, generator=gen)), schedule.model_time(t)


class Recorder:
    """eps_fn that exits at a threshold and keeps every call's input."""

    def __init__(self, threshold: float):
        self.engine, self.inputs = EarlyExitModel(model, method, threshold=threshold, mode="realised"), []

    def __call__(self, x, model_t):
        self.inputs.append((x.clone(), batch_time(model_t, len(x)).clone()))
        return self.engine(x, model_t)


@torch.no_grad()
def sampled_pool(round_: int):
    """The sampler's own inputs: `--pool` trajectories from fresh noise (seed 1, not the cells' 0), a
    quarter each at thresholds 0.05, 0.06, 0.07, 0.1, every network call kept. (x, model_t) tensors."""
    xs, ts = [], []
    thresholds = (0.05, 0.06, 0.07, 0.1)
    per = args.pool // len(thresholds)
    for k, thr in enumerate(thresholds):
        first = 100_000 * (round_ + 1) + k * per
        rec = Recorder(thr)
        SAMPLERS.get(s["sampler"])(rec, schedule, NoiseSource(1, torch.arange(first, first + per)), shape,
                                   s["steps"], **s["options"])
        xs += [x for x, _ in rec.inputs]
        ts += [t for _, t in rec.inputs]
    return torch.cat(xs), torch.cat(ts)


def refit(arm: str, seed: int = 0) -> dict:
    """Train the UEMs alone for --steps steps of 64 (AdamW at the study's lr x extras_lr_mult, as the
    calibration does) to tanh|g_i - g_N| on the frozen backbone; returns their state dict."""
    model.extras.load_state_dict(original_uems)
    params = list(model.extras.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=t_cfg["lr"] * t_cfg["extras_lr_mult"], betas=tuple(t_cfg["betas"]),
                            weight_decay=t_cfg["weight_decay"])
    data = data_batches(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    pool, losses, tick = None, [], time.perf_counter()
    for step in range(args.steps):
        if arm == "sampled" and step in (0, args.steps // 2):  # round 1: the original UEMs; round 2: the refitted
            model.extras.requires_grad_(False)
            pool = sampled_pool(0 if step == 0 else 1)
            model.extras.requires_grad_(True)
            say(f"  {arm}: pool of {len(pool[0])} sampler inputs at step {step} ({time.perf_counter() - tick:.0f} s)")
        x_a, t_a = next(data)
        if arm == "sampled":
            pick = torch.randint(len(pool[0]), (32,), generator=gen)
            x_b, t_b = pool[0][pick], pool[1][pick]
        else:
            x_b, t_b = next(data)
        x_t, model_t = torch.cat([x_a, x_b]), torch.cat([t_a, t_b]).float()
        with torch.no_grad():
            out = exit_predictions(model, x_t, model_t)
        final = out.final.float()
        loss = sum((method.uncertainty(model, i, h, model_t) - torch.tanh((g.float() - final).abs())).pow(2).mean()
                   for i, (g, h) in enumerate(zip(out.preds, out.hiddens))) / num_exits
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t_cfg["grad_clip"])
        opt.step()
        losses.append(loss.item())
    model.extras.requires_grad_(False)
    k = min(50, len(losses))
    say(f"  {arm}: {args.steps} steps in {time.perf_counter() - tick:.0f} s, mean loss of the first {k} steps "
        f"{sum(losses[:k]) / k:.5f}, of the last {k} {sum(losses[-k:]) / k:.5f}")
    return copy.deepcopy(model.extras.state_dict())


# ---- measurement ---------------------------------------------------------------------------------------

def total_variation(x):
    return ((x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3)) + (x[..., 1:] - x[..., :-1]).abs().mean((1, 2, 3)))


def run(threshold, n: int):
    cell = {**s, "threshold": threshold, "n_samples": n}
    images, stats = generate(model, schedule, cell, cfg["run"]["seed"], shape, device, progress=False, method=method)
    decide = method.decide_gmacs(model) if threshold is not None else None
    return images, stats["layer_ratio"], gflops_per_call(flops, stats["record"], decide)


tick = time.perf_counter()
full, _, full_gmacs = run(None, args.n)
full_tv = total_variation(full)
limits = {args.n: float(full_tv.max()), 200: float(full_tv[:200].max())}
full_fid = fid_kid(full, reference)
say(f"full depth: FID {full_fid['fid']:.2f} (the cell: 51.94), {full_gmacs:.3f} GMACs per call "
    f"({time.perf_counter() - tick:.0f} s)")
rows = [{"arm": "full depth", "threshold": "", "n": args.n, "layer_ratio": 1.0, "gmacs": round(full_gmacs, 4),
         "failed": 0, "fid": round(full_fid["fid"], 3), "kid": round(full_fid["kid_mean"], 5)}]


def fid_cell(arm: str, threshold: float):
    images, ratio, gmacs = run(threshold, args.n)
    result = fid_kid(images, reference)
    failed = int((total_variation(images) > limits[args.n]).sum())
    say(f"  {arm} at {threshold}: layer ratio {ratio:.3f}, {gmacs:.3f} GMACs, failed {failed} of {args.n}, "
        f"FID {result['fid']:.2f} ({result['fid'] / full_fid['fid']:.2f}x full depth), KID {result['kid_mean']:.4f}")
    if args.grid_dir:
        save_grid(images[:64], Path(args.grid_dir) / f"trajectory_refit-{arm}-thr{threshold}.png")
    rows.append({"arm": arm, "threshold": threshold, "n": args.n, "layer_ratio": round(ratio, 4),
                 "gmacs": round(gmacs, 4), "failed": failed, "fid": round(result["fid"], 3),
                 "kid": round(result["kid_mean"], 5)})


say("\nthe checkpoint's own UEMs (eq. 9), as the cell:")
fid_cell("eq. 9 (checkpoint)", 0.06)

for arm in ("data", "sampled"):
    say(f"\narm {arm}: refit")
    model.extras.load_state_dict(refit(arm))
    say(f"  scan on samples 0-199: threshold, layer ratio, failed of 200")
    scan = []
    for thr in (float(v) for v in args.scan.split(",")):
        images, ratio, _ = run(thr, 200)
        failed = int((total_variation(images) > limits[200]).sum())
        scan.append((thr, ratio))
        say(f"  {thr:6.3f}  {ratio:.3f}  {failed:3d}")
        rows.append({"arm": arm, "threshold": thr, "n": 200, "layer_ratio": round(ratio, 4), "gmacs": "",
                     "failed": failed, "fid": "", "kid": ""})
    chosen = sorted({min(scan, key=lambda p: abs(p[1] - goal))[0] for goal in (0.8, 0.7, 0.6)})
    for thr in chosen:
        fid_cell(arm, thr)

if args.csv:
    provenance = {"checkpoint": args.checkpoint, "refit_steps": args.steps, "pool": args.pool, "sampler": s["sampler"],
                  "sampler_steps": s["steps"], "seed": cfg["run"]["seed"], "dataset_checksum": checksum,
                  "scale": "cpu-study", "torch_version": torch.__version__,
                  "command": " ".join(["python", *sys.argv])}
    path = Path(args.csv)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *provenance])
        writer.writeheader()
        writer.writerows({**r, **provenance} for r in rows)
    tmp.replace(path)
say(f"\ndone in {(time.perf_counter() - tick) / 60:.1f} min")
