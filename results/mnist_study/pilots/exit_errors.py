"""Per-exit noise-prediction MSE of a checkpoint in five buckets of diffusion time, DeeDiff's pseudo
target tanh|g_i - eps| (eq. 9, mean) and the UEMs' mean uncertainty u_i, on 250 of the embedded
5,000 MNIST digits (every 20th), one draw of t and noise per bucket (seeded).

    python results/mnist_study/pilots/exit_errors.py CHECKPOINT [METHOD] [ema|model]
"""
import sys, time, torch
from bench.config import load_config, resolve
from bench.setup import build_model, build_schedule, build_train_dataset
from bench.checkpoint import load_weights_into
from methods import build_method
from methods.common import exit_predictions
torch.manual_seed(0)
ckpt = sys.argv[1] if len(sys.argv) > 1 else "builtin:uvit_tiny_mnist.pt"
method_name = sys.argv[2] if len(sys.argv) > 2 else "deediff"
cfg = resolve(load_config(None), {"method": method_name, "dataset": "mnist", "profile": "tiny"}, [])
method = build_method(method_name, cfg["method"])
model = build_model(cfg, method); load_weights_into(model, ckpt, prefer=(sys.argv[3] if len(sys.argv) > 3 else "ema")); model.eval()
ds = build_train_dataset(cfg); sched = build_schedule(cfg)
x0 = torch.stack([torch.as_tensor(ds[i][0]) for i in range(0, 5000, 20)]).float()  # 250 images
g = torch.Generator().manual_seed(1)
rows = []
with torch.no_grad():
    for tb in range(5):
        t = (torch.rand(len(x0), generator=g) * 0.2 + tb * 0.2).clamp(1e-3, 1)
        noise = torch.randn(x0.shape, generator=g)
        xt = sched.add_noise(x0, t, noise)
        out = exit_predictions(model, xt, sched.model_time(t))
        mse = [(p - noise).pow(2).mean().item() for p in out.preds]
        tgt = [torch.tanh((p - noise).abs()).mean().item() for p in out.preds]
        u = None
        if method_name == "deediff":
            mt = sched.model_time(t)
            u = [method.uncertainty(model, i, h, mt).mean().item() for i, h in enumerate(out.hiddens)]
        print(f"t in [{tb*0.2:.1f},{tb*0.2+0.2:.1f}) mse:", " ".join(f"{m:.3f}" for m in mse))
        print("      target tanh|e|:", " ".join(f"{m:.3f}" for m in tgt))
        if u: print("      uem mean u    :", " ".join(f"{m:.3f}" for m in u))
