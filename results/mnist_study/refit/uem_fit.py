"""How well the refitted UEMs (README, "An exit signal in data space") fit their own targets: on 200
training digits (every 300th of full MNIST) noised at fixed times, the mean UEM map u_i against the mean
pseudo target (eq. 9's tanh|g_i - eps|, tanh|x0_i - x0| for uem_target data, tanh|g_i - g_N| for final),
at every second exit.

    python results/mnist_study/refit/uem_fit.py CHECKPOINT noise|data|final   (output: uem_fit.txt)
"""
import os
import sys

import torch
from bench.checkpoint import load_weights_into
from bench.config import load_config, resolve
from bench.setup import build_model, build_schedule, build_train_dataset
from methods import build_method
from methods.common import exit_predictions
torch.set_num_threads(1)
ckpt, target = sys.argv[1], sys.argv[2]
cfg = resolve(load_config(), {"method": "deediff", "dataset": "mnist", "profile": "study"},
              {"data.path": os.environ.get("MNIST_ZIP", "../shared/data/mnist-png.zip"), "methods.deediff.uem_target": target})
method = build_method("deediff", cfg["method"]); model = build_model(cfg, method)
load_weights_into(model, ckpt); model.eval()
ds, sch = build_train_dataset(cfg), build_schedule(cfg); method.diffusion_schedule = sch
x0 = torch.stack([torch.as_tensor(ds[i][0]) for i in range(0, len(ds), len(ds)//200)][:200]).float()
g = torch.Generator().manual_seed(0)
for t in (0.05, 0.2, 0.5, 0.9):
    tt = torch.full((len(x0),), t, dtype=torch.float64); eps = torch.randn(x0.shape, generator=g)
    xt = sch.add_noise(x0, tt, eps); mt = sch.model_time(tt)
    with torch.no_grad():
        out = exit_predictions(model, xt, mt, None)
        u = [method.uncertainty(model, i, h, mt).mean().item() for i, h in enumerate(out.hiddens)]
        tgt = [p.mean().item() for p in method.pseudo_targets([p.float() - eps for p in out.preds], mt, xt)]
    print(f"t={t}: " + " ".join(f"exit {i}: {a:.3f}/{b:.3f}" for i, (a, b) in list(enumerate(zip(u, tgt)))[::2]))
