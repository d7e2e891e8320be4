"""A stored DeeDiff checkpoint measured again on fresh noise: does an operating point hold off the noise it was
chosen on?

Every cell of the study samples seed 0, and the thresholds of the refitted exit signal at 3x the budget
were picked from a scan of seed 0's first 200 samples (trajectory_refit.py). This samples the same
checkpoint as `bench eval` does (`bench.sample.generate`: 1,000 samples, batch 100, DPM-Solver 25, realised
engine; FID and KID against the same 10,000 reference digits) but from another seed's noise, at full
depth and at the given thresholds, and prints layer ratio, GMACs per network call, FID and KID.

    python results/mnist_study/fresh_noise.py CHECKPOINT [--seed 1] [--thresholds full,0.03] [--set KEY=VALUE ...]

`--set` takes the method options the checkpoint was trained with (methods.deediff.uem_target=final).
Output of `run.sh budget`: budget/fresh_noise_seed1.txt. Not cells of runs.csv (a run's seed is also its
training seed there).
"""
import argparse
import time

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.evaluate import fid_kid
from bench.evaluate.measure import _reference
from bench.sample import generate, gflops_per_call
from bench.setup import build_model, build_schedule, image_geometry, prepare_data
from methods import build_method

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--seed", type=int, default=1)
parser.add_argument("--thresholds", default="full,0.03")
parser.add_argument("--set", action="append", default=[], help="config override, KEY=VALUE (repeatable)")
args = parser.parse_args()

overrides = {"data.path": "../shared/data/mnist-png.zip"}
for item in args.set:
    key, _, value = item.partition("=")
    overrides[key] = value
cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"}, overrides)
prepare_data(cfg)
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint, prefer="ema", fresh_extras=False)
model.eval()
schedule, device = build_schedule(cfg), torch.device("cpu")
resolution, channels, _ = image_geometry(cfg)
shape = (channels, resolution, resolution)
flops = model.backbone.flops_per_part()
reference = _reference(cfg, device, progress=False)

print(f"{args.checkpoint}\nseed {args.seed}, {cfg['sample']['n_samples']} samples, {cfg['sample']['sampler']} "
      f"{cfg['sample']['steps']} steps, overrides {overrides}", flush=True)
print(f"{'threshold':>9}  {'layer ratio':>11}  {'GMACs/call':>10}  {'FID':>7}  {'KID':>7}", flush=True)
tick = time.perf_counter()
for spec in args.thresholds.split(","):
    threshold = None if spec == "full" else float(spec)
    images, stats = generate(model, schedule, {**cfg["sample"], "threshold": threshold}, args.seed, shape, device,
                             progress=False, method=method)
    gmacs = gflops_per_call(flops, stats["record"], method.decide_gmacs(model) if threshold is not None else None)
    result = fid_kid(images, reference)
    print(f"{spec:>9}  {stats['layer_ratio']:11.3f}  {gmacs:10.4f}  {result['fid']:7.2f}  {result['kid_mean']:7.4f}",
          flush=True)
print(f"done in {(time.perf_counter() - tick) / 60:.1f} min")
