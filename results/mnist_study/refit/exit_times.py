"""Where the refitted UEMs exit along the trajectory: the layer ratio of each refit cell per band of
sampler time (network time / 1000), averaged over the calls in the band, from refit/per_call.csv.

    python results/mnist_study/refit/exit_times.py   (output: exit_times.txt)
"""
import json
from pathlib import Path

import pandas as pd

here = Path(__file__).parent
calls = pd.read_csv(here / "per_call.csv")
runs = pd.read_csv(here / "runs.csv", dtype=str)
target = {r.run_id: json.loads(r.method_options).get("uem_target", "noise") for r in runs.itertuples()}
bands = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.01)]
calls["t"] = calls["model_time"] / 1000
print("layer ratio per band of t; rows: uem_target, threshold, overall layer ratio")
print("target  thr    all   " + "  ".join(f"t{lo:.1f}-{min(hi, 1):.1f}" for lo, hi in bands))
for run_id, rows in calls.groupby("run_id", sort=False):
    thr = run_id.split("-thr")[1].split("-")[0]
    cells = [rows[(rows.t >= lo) & (rows.t < hi)]["layer_ratio"].mean() for lo, hi in bands]
    print(f"{target.get(run_id, '?'):6}  {thr:5}  {rows['layer_ratio'].mean():.3f}  "
          + "  ".join(f"{c:7.3f}" for c in cells))
