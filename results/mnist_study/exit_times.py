"""Where exits happen along the trajectory: each cell's layer ratio per band of sampler time (network
time / 1000), averaged over the calls in the band, from a store's per_call.csv.

    python results/mnist_study/exit_times.py [STORE] [METHOD]
        (STORE: results/mnist_study/refit by default, output refit/exit_times.txt; METHOD: deediff)
"""
import json
import sys
from pathlib import Path

import pandas as pd

store = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "refit")
method = sys.argv[2] if len(sys.argv) > 2 else "deediff"
DEFAULTS = {"uem_target": "noise", "exit_rule": "per_sample", "patience": 1, "compare": "auto", "beta_ual": 1.0,
            "layerwise_loss": True, "shared_uem": False, "loss_form": "official"}
calls = pd.read_csv(store / "per_call.csv")
runs = pd.read_csv(store / "runs.csv", dtype=str)
runs = runs[runs["method"] == method]
variant = {}
for r in runs.itertuples():
    options = json.loads(r.method_options)
    away = [f"{k}={options[k]}" for k, v in DEFAULTS.items() if options.get(k, v) != v]
    variant[r.run_id] = ",".join(away + [f"seed{r.seed}"] * (r.seed != "0")) or "default"
bands = [(0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 0.7), (0.7, 1.01)]
calls = calls[calls["run_id"].isin(variant)].assign(t=lambda f: f["model_time"] / 1000)
print(f"{store}: {method}'s layer ratio per band of t (variant: the options away from the defaults)")
print(f"{'variant':30} {'thr':6} {'all':>6}  " + "  ".join(f"t{lo:.1f}-{min(hi, 1):.1f}" for lo, hi in bands))
for run_id, rows in calls.groupby("run_id", sort=False):
    thr = run_id.split("-thr")[1].split("-")[0]
    cells = [rows[(rows.t >= lo) & (rows.t < hi)]["layer_ratio"].mean() for lo, hi in bands]
    print(f"{variant[run_id]:30} {thr:6} {rows['layer_ratio'].mean():6.3f}  " + "  ".join(f"{c:7.3f}" for c in cells))
