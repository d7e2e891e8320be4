# The profile behind results/perf.md: why deciding after every block costs more than issue 12's targets on
# the tiny U-ViT (13 blocks, width 96), random weights, two CPU threads. Run from the project root:
#   python results/perf_profile.py > results/perf_profile.txt      (about a minute; nothing else running)
# 1. torch.profiler: 50 network calls at batch 1 of DeeDiff deciding after every block where nothing exits
#    (threshold 0) against the same calls at full depth.
# 2. Each kernel of one DeeDiff decision timed where it runs (right after a block), against the block, at
#    batch 1 and 64: every op costs several microseconds of dispatch, and the block it follows is short.
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench.engine import EarlyExitModel
from bench.perf import _models

torch.set_grad_enabled(False)
cfg, method, model = _models("uvit_tiny", "mnist", {}, torch.device("cpu"), None, ["deediff"])["deediff"]
bb, uem = model.backbone, model.extras["uem"]


def calls(threshold, batch, n):
    x, t = torch.randn(batch, 1, 28, 28), torch.full((batch,), 0.5)
    for _ in range(n):
        EarlyExitModel(model, method, threshold=threshold)(x, t)


for threshold in (0.0, None):
    calls(threshold, 1, 10)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        calls(threshold, 1, 50)
    print(f"== batch 1, 50 network calls, {'DeeDiff deciding (threshold 0)' if threshold == 0.0 else 'full depth'}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))

STEPS = ["hidden (narrow)", "UEM (baddbmm)", "sigmoid_", "mean over the map", "below threshold",
         "patience count", "count > patience", "engine: sum + item"]
for batch in (1, 64):
    x, t = torch.randn(batch, 1, 28, 28), torch.full((batch,), 0.5)
    times, blocks = [[] for _ in STEPS], []
    for rep in range(60 if batch == 1 else 12):
        state, count = bb.prepare(x, t), None
        for i in range(bb.num_exits - 1):
            tick = time.perf_counter()
            state = bb.run_block(i, state)
            marks = [time.perf_counter()]
            h = bb.hidden(state); marks.append(time.perf_counter())
            y = torch.baddbmm(uem[i].proj.bias[:, None], uem[i].proj.weight.expand(batch, -1, -1), h.transpose(1, 2)); marks.append(time.perf_counter())
            y = torch.sigmoid_(y); marks.append(time.perf_counter())
            score = y.flatten(1).mean(1); marks.append(time.perf_counter())
            below = score < 0.0; marks.append(time.perf_counter())
            count = below.long() if count is None else count + below; marks.append(time.perf_counter())
            stop = count > 1; marks.append(time.perf_counter())
            int(stop.sum()); marks.append(time.perf_counter())
            if rep >= 2:  # the first calls warm up
                blocks.append(marks[0] - tick)
                for k in range(len(STEPS)):
                    times[k].append(marks[k + 1] - marks[k])
    block = statistics.median(blocks) * 1e6
    total = sum(statistics.median(v) * 1e6 for v in times)
    print(f"== batch {batch}: one block {block:.0f} us; one DeeDiff decision {total:.0f} us "
          f"({100 * total / block:.1f}% of the block), medians:")
    for name, v in zip(STEPS, times):
        print(f"   {name:22s} {statistics.median(v) * 1e6:7.1f} us")
