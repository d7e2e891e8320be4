# The profile behind results/perf.md: DeeDiff deciding after every block where nothing exits (threshold 0)
# against full depth, tiny U-ViT, random weights, batch 1, 10 DPM-Solver steps, 5 runs each.
# Run: python results/perf_profile.py (output: results/perf_profile.txt)
import torch, time
from bench.perf import _models
from bench.engine import EarlyExitModel
from bench.diffusion import SAMPLERS, NoiseSource
from bench.setup import build_schedule
dev=torch.device('cpu')
models=_models('uvit_tiny','mnist',{},dev,None,['baseline','deediff'])
cfg,method,model=models['deediff']; sched=build_schedule(cfg); samp=SAMPLERS.get('dpm_solver')
def run(thr, mdl, meth):
    e=EarlyExitModel(mdl, meth, threshold=thr)
    with torch.no_grad(): samp(e, sched, NoiseSource(0, range(1)), (1,28,28), 10, device=dev)
for _ in range(3): run(0.0, model, method); run(None, models['baseline'][2], models['baseline'][1])
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(5): run(0.0, model, method)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
with profile(activities=[ProfilerActivity.CPU]) as p:
    for _ in range(5): run(None, models['baseline'][2], models['baseline'][1])
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
