"""Can the DDIM U-Net's early exits predict the noise at all? A probe of the exit heads alone.

DeeDiff's U-Net exits (Table 6: "interpolation, then a light head") read a block's feature map brought to
28x28 and predict the noise with a fresh light head (GroupNorm, swish, 3x3 conv). After the study's
1,000-step fine-tune their MSE against the noise is 0.3-0.97 (loss_per_timestep.csv; predicting zero
gives 1.0), so every UEM says u close to 1 and nothing exits. This probe asks whether that is the budget
(the heads are new and learn at the backbone's learning rate) or the structure (an exit before the last
up level has not seen the full-resolution skips, which carry the per-pixel noise): it trains only the
exit heads of a DeeDiff U-Net checkpoint, on its frozen EMA backbone, for --steps steps at --lr on full
MNIST, and prints each exit's MSE per band of t on 512 held-out noisings before and after.

    python results/mnist_study/unet_exit_probe.py CHECKPOINT --dataset-path ZIP [--steps 300] [--lr 2e-3]
"""
import argparse

import torch

from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.setup import build_model, build_schedule, build_train_dataset
from methods import build_method
from methods.common import exit_predictions

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("--dataset-path", default=None)
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--lr", type=float, default=2e-3)
parser.add_argument("--batch", type=int, default=64)
args = parser.parse_args()
torch.manual_seed(0)

cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"},
              {"data.path": args.dataset_path, "model.backbone": "ddim_tiny", "model.schedule": "linear"})
method = build_method("deediff", cfg["method"])
model = build_model(cfg, method)
load_weights_into(model, args.checkpoint)
model.eval()
dataset, schedule = build_train_dataset(cfg), build_schedule(cfg)
heads = model.backbone.exit_heads
for p in model.parameters():
    p.requires_grad_(False)
for p in heads.parameters():
    p.requires_grad_(True)
optimizer = torch.optim.AdamW(heads.parameters(), lr=args.lr, weight_decay=0.0)
bands = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.0)]


def batch(indices, gen):
    x0 = torch.stack([torch.as_tensor(dataset[int(i)][0]) for i in indices]).float()
    t = torch.rand(len(x0), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return schedule.add_noise(x0, t, noise), schedule.model_time(t), t, noise


held_gen = torch.Generator().manual_seed(1)
held = batch(torch.arange(0, len(dataset), len(dataset) // 512)[:512], held_gen)


def report(title):
    x_t, model_t, t, noise = held
    with torch.no_grad():
        preds = exit_predictions(model, x_t, model_t).preds
    print(title)
    print("  t band       " + " ".join(f"exit {i:<3d}" for i in range(len(preds))))
    for lo, hi in bands:
        keep = (t >= lo) & (t < hi)
        row = [float((g[keep] - noise[keep]).pow(2).mean()) for g in preds]
        print(f"  [{lo:.1f}, {hi:.1f})   " + " ".join(f"{v:8.3f}" for v in row))


report("before: the checkpoint's exit heads (MSE against the noise, 512 held-out noisings)")
gen = torch.Generator().manual_seed(2)
for step in range(args.steps):
    x_t, model_t, _, noise = batch(torch.randint(0, len(dataset), (args.batch,), generator=gen), gen)
    preds = exit_predictions(model, x_t, model_t).preds[:-1]  # the last exit is the official output path
    loss = sum((g - noise).pow(2).mean() for g in preds) / len(preds)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    if (step + 1) % 100 == 0:
        print(f"  step {step + 1}: mean exit MSE {loss.item():.3f}", flush=True)
report(f"after {args.steps} steps training the exit heads alone at lr {args.lr:g} (backbone frozen)")
