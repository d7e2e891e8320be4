"""`bench run` and `bench eval`: train or reuse a checkpoint, then measure it (bench.evaluate.measure:
sampling through the engine, FID, the side analyses, the stored rows).
"""
from __future__ import annotations

import time
from pathlib import Path

from bench.checkpoint import checkpoint_dir
from bench.evaluate.measure import check_results, measure, row_hash, skip_stored  # noqa: F401  (bench.run's API)
from bench.setup import prepare_data
from bench.train import train, weights_config
from methods import build_method


def default_threshold(cfg: dict, method) -> float | None:
    """sample.threshold if set, else the method's own `threshold` hyper-parameter (None: full depth)."""
    value = cfg["sample"]["threshold"]
    return method.threshold if value is None else value


def run(cfg: dict, *, progress: bool = True, force: bool = False) -> dict:
    """Train (or reuse), then evaluate at the configured threshold; returns the row."""
    check_results(Path(cfg["run"]["results"]))  # a damaged results file: stop before training, not after
    prepare_data(cfg)
    tick = time.perf_counter()
    checkpoint = train(cfg, progress=progress)
    train_seconds = time.perf_counter() - tick
    method = build_method(cfg["run"]["method"], cfg["method"])
    rows = measure(cfg, checkpoint, [default_threshold(cfg, method)], progress=progress, force=force,
                    extra={"train_seconds_this_call": round(train_seconds, 1)})
    return rows[-1]


def finished_checkpoint(cfg: dict) -> Path:
    """The final checkpoint of this config, or an error that says which command makes it."""
    path = checkpoint_dir(weights_config(cfg)) / "final.pt"
    if not path.exists():
        r = cfg["run"]
        raise FileNotFoundError(
            f"no trained checkpoint for this configuration ({path}); make it with "
            f"`bench train --method {r['method']} --dataset {r['dataset']} --profile {r['profile']}` "
            f"and the same --set options, or use `bench run`")
    return path
