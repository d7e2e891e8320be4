"""Why DeeDiff's exits cost quality here: the exit signal per sample against the error it stands for.

For a DeeDiff checkpoint, on 500 training digits (every 120th of full MNIST's 60,000, or of the embedded
5,000 without --dataset-path) noised at fixed diffusion times, per exit i and sample: the UEM's mean
uncertainty u_i (the exit signal), the mean pseudo target tanh|g_i - eps| it is trained to predict, and
the exit's MSE against the final exit's. Prints per time: the Pearson correlation of u_i with the
target over samples (does the signal rank samples?), and, for a threshold, where the exit rule
(first exit with u_i below it; the first half needs it twice, patience 1) stops each sample and how
much worse than the final exit that prediction is.

    python results/mnist_study/exit_signal.py CHECKPOINT [--dataset-path ZIP] [--thresholds 0.05,0.07]
"""
import argparse

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.setup import build_model, build_schedule, build_train_dataset
from methods import build_method
from methods.common import encoder_exits, exit_predictions

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--dataset-path", default=None)
parser.add_argument("--thresholds", default="0.05,0.07,0.1")
parser.add_argument("--times", default="0.02,0.1,0.3,0.5,0.7,0.9")
args = parser.parse_args()

cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"},
              {"data.path": args.dataset_path})
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint)
model.eval()
dataset, schedule = build_train_dataset(cfg), build_schedule(cfg)
step = max(1, len(dataset) // 500)
x0 = torch.stack([torch.as_tensor(dataset[i][0]) for i in range(0, len(dataset), step)][:500]).float()
first_half = encoder_exits(model.backbone)
gen = torch.Generator().manual_seed(0)

with torch.no_grad():
    for t_value in map(float, args.times.split(",")):
        t = torch.full((len(x0),), t_value)
        noise = torch.randn(x0.shape, generator=gen)
        x_t = schedule.add_noise(x0, t, noise)
        model_t = schedule.model_time(t)
        out = exit_predictions(model, x_t, model_t)
        u = torch.stack([method.uncertainty(model, i, h, model_t).flatten(1).mean(1)
                         for i, h in enumerate(out.hiddens)])                      # (exits, B)
        target = torch.stack([torch.tanh((g - noise).abs()).flatten(1).mean(1) for g in out.preds])
        mse = torch.stack([(g - noise).pow(2).flatten(1).mean(1) for g in out.preds])
        corr = [float(torch.corrcoef(torch.stack([u[i], target[i]]))[0, 1]) for i in range(len(u) - 1)]
        print(f"t = {t_value:.2f}  corr(u_i, target_i) over samples, exits 0-11: "
              + " ".join(f"{c:+.2f}" for c in corr))
        print(f"          mean u_i: " + " ".join(f"{float(v):.3f}" for v in u.mean(1)))
        print(f"     mean target_i: " + " ".join(f"{float(v):.3f}" for v in target.mean(1)))
        for threshold in map(float, args.thresholds.split(",")):
            below = u < threshold
            exits = torch.full((len(x0),), len(u) - 1, dtype=torch.long)
            crossings = torch.zeros(len(x0), dtype=torch.long)
            done = torch.zeros(len(x0), dtype=torch.bool)
            for i in range(len(u) - 1):
                crossings += below[i].long()
                stop = (crossings > 1) if i < first_half else below[i]
                new = stop & ~done
                exits[new], done = i, done | new
            chosen = mse[exits, torch.arange(len(x0))]
            ratio = chosen / mse[-1].clamp_min(1e-12)
            hist = torch.bincount(exits, minlength=len(u)).tolist()
            print(f"    threshold {threshold:.3f}: exit histogram {hist}; layer ratio {float((exits + 1).float().mean()) / len(u):.2f}; "
                  f"MSE of the chosen exit / final: median {float(ratio.median()):.2f}, "
                  f"90th percentile {float(ratio.quantile(0.9)):.2f}")
