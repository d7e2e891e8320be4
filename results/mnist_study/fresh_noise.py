"""The same checkpoint's cells on fresh sampling noise: is an operating point a property of the model?

The thresholds of the refitted 3x checkpoint (README "A refitted exit signal meets the layer-ratio bar")
were chosen after a scan of the first 200 samples of the same noise that the cells then measured (seed
0, samples 0-999). This measures the checkpoint again as `bench eval` measures a cell
(`bench.sample.generate`, DPM-Solver 25, batch 100, realised engine, FID and KID of 1,000 samples against
the same reference statistics, GMACs per call by fvcore with the UEMs' cost) but on other noise: sample
i's noise is NoiseSource(NOISE_SEED, i), which no cell and no threshold choice has seen. The full depth of
the same noise is measured first, so every ratio is against the same images' full depth.

The training seed stays what the checkpoint was made with; only the sampling noise changes. `bench eval
--seed` would change both (the run seed is part of the checkpoint's hash), hence this script.

    python results/mnist_study/fresh_noise.py CHECKPOINT [--thresholds 0.02,0.025,0.03,0.035] [--noise-seed 1]
        [--uem-target final] [--n 1000] [--csv CSV]

Output of `run.sh budget`: budget/fresh_noise.txt and budget/fresh_noise.csv.
"""
import argparse
import csv
import sys
import time
from pathlib import Path

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.data import dataset_checksum
from bench.evaluate import fid_kid
from bench.evaluate.measure import _reference
from bench.sample import generate, gflops_per_call
from bench.setup import build_model, build_schedule, image_geometry, prepare_data
from methods import build_method

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--thresholds", default="0.02,0.025,0.03,0.035")
parser.add_argument("--noise-seed", type=int, default=1, help="the sampling noise's seed (the cells': 0)")
parser.add_argument("--uem-target", default="final", help="methods.deediff.uem_target of the checkpoint")
parser.add_argument("--n", type=int, default=1000, help="samples per cell")
parser.add_argument("--csv", default=None, help="write the measured rows here")
args = parser.parse_args()

MNIST = "../shared/data/mnist-png.zip"
cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"},
              {"data.path": MNIST, "methods.deediff.uem_target": args.uem_target})
prepare_data(cfg)
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint, prefer="ema", fresh_extras=False)
model.eval().requires_grad_(False)
schedule, s = build_schedule(cfg), cfg["sample"]
resolution, channels, _ = image_geometry(cfg)
shape = (channels, resolution, resolution)
device = torch.device("cpu")
flops = model.backbone.flops_per_part()
reference = _reference(cfg, device, progress=False)
checksum = dataset_checksum("mnist", MNIST, cfg["data"]["split"])


def cell(threshold: float | None) -> dict:
    tick = time.perf_counter()
    sample_cfg = {**s, "threshold": threshold, "n_samples": args.n}
    images, stats = generate(model, schedule, sample_cfg, args.noise_seed, shape, device, progress=False, method=method)
    decide = method.decide_gmacs(model) if threshold is not None else None
    result = fid_kid(images, reference)
    return {"threshold": "full" if threshold is None else threshold, "noise_seed": args.noise_seed, "n": args.n,
            "layer_ratio": round(stats["layer_ratio"], 4),
            "gmacs_per_call": round(gflops_per_call(flops, stats["record"], decide), 4),
            "fid": round(result["fid"], 3), "kid": round(result["kid_mean"], 5),
            "seconds": round(time.perf_counter() - tick)}


rows = [cell(None)]
full_fid = rows[0]["fid"]
print(f"noise seed {args.noise_seed}, {args.n} samples; threshold, layer ratio, FID, x full depth, KID", flush=True)
print(f"  full   1.000  {full_fid:7.2f}  1.00  {rows[0]['kid']:.4f}", flush=True)
for thr in (float(v) for v in args.thresholds.split(",")):
    row = cell(thr)
    rows.append(row)
    print(f"  {thr:<6}  {row['layer_ratio']:.3f}  {row['fid']:7.2f}  {row['fid'] / full_fid:.2f}  {row['kid']:.4f}",
          flush=True)

if args.csv:
    provenance = {"checkpoint": args.checkpoint, "uem_target": args.uem_target, "sampler": s["sampler"],
                  "sampler_steps": s["steps"], "batch": s["batch_size"], "engine_mode": s["engine_mode"],
                  "dataset_checksum": checksum, "scale": "cpu-study", "torch_version": torch.__version__,
                  "command": " ".join(["python", *sys.argv])}
    path = Path(args.csv)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *provenance])
        writer.writeheader()
        writer.writerows({**r, **provenance} for r in rows)
    tmp.replace(path)
