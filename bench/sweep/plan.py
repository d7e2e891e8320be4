"""A sweep's plan: the command line's lists and grids, and the cells they expand to (no Ray here)."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

from bench.config import ConfigError, load_config, parse_override, resolve

# ---- the command line's lists -------------------------------------------------------------

def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets, so that '{a: 1, b: 2},{a: 3}' is two values."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_list(text: str, flag: str) -> list[str]:
    """'a,b' -> ['a', 'b']; an empty list is an error that names the flag."""
    items = _split_top(str(text))
    if not items:
        raise ConfigError(f"{flag} is empty; give a comma-separated list")
    return items


def parse_seeds(text: str) -> list[int]:
    try:
        return [int(item) for item in parse_list(text, "--seeds")]
    except ValueError:
        raise ConfigError(f"--seeds must be whole numbers like 0,1,2; got {text!r}") from None


def parse_grid(items: list[str] | None) -> dict[str, list]:
    """['train.lr=1e-3,2e-4', 'model.kwargs={depth: 7},{depth: 13}'] -> {key: [values]} (values read as YAML)."""
    grid: dict[str, list] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--grid {item!r} is not of the form key=v1,v2 (for example --grid train.lr=1e-3,2e-4)")
        key, values = item.split("=", 1)
        key = key.strip()
        grid[key] = [parse_override(f"{key}={value}")[1] for value in parse_list(values, f"--grid {key}")]
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """The cartesian product of a grid: one dict of overrides per point ([{}] for no grid)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# ---- cells --------------------------------------------------------------------------------

def resolve_cells(config: str | Path | None, run: dict | None, overrides: list[str] | None, *,
                  methods: list[str] | None = None, datasets: list[str] | None = None,
                  seeds: list[int] | None = None, grid: dict[str, list] | None = None) -> list[tuple[str, dict]]:
    """(label, resolved config) for every method x dataset x seed x grid point; user mistakes raise here.

    A label names what varies (Tune's status table shows 20 characters of it), e.g. 'deediff/seed1'.
    """
    from methods import build_method

    base = load_config(config)
    run = dict(run or {})
    methods = methods or [run.get("method") or base["run"]["method"]]
    datasets = datasets or [run.get("dataset") or base["run"]["dataset"]]
    seeds = seeds if seeds is not None else [base["run"]["seed"] if run.get("seed") is None else run["seed"]]
    cells = []
    for method, dataset, seed, point in itertools.product(methods, datasets, seeds, grid_points(grid or {})):
        cfg = resolve(base, run={**run, "method": method, "dataset": dataset, "seed": seed}, overrides=overrides,
                      sweep=point)
        check_sweep_section(cfg)
        grid_of_method = cfg["method"].get("thresholds")
        if grid_of_method is not None and not isinstance(grid_of_method, (list, tuple)):
            raise ConfigError(f"methods.{method}.thresholds must be a list like [0.2, 0.1], got {grid_of_method!r}")
        try:
            build_method(method, cfg["method"])  # a name that bench.yaml lists but no plugin registers, bad hparams
        except ValueError as err:
            raise ConfigError(str(err)) from None
        parts = [method] + [dataset] * (len(datasets) > 1) + [f"seed{seed}"] * (len(seeds) > 1)
        cells.append(("/".join(parts) + "".join(f" {k}={v}" for k, v in point.items()), cfg))
    return cells


def method_thresholds(method) -> list[float | None]:
    """The method's grid: methods.<name>.thresholds of bench.yaml (build_method puts it in
    default_thresholds), else the plugin's own; a method without exits gets full depth only."""
    return list(method.default_thresholds) or [None]


def _item(cfg: dict, **extra) -> dict:
    return {"cfg": cfg, "cwd": os.getcwd(), **extra}


def _checkpoint(cfg: dict) -> Path:
    from bench.checkpoint import checkpoint_dir
    from bench.train import weights_config

    return checkpoint_dir(weights_config(cfg)) / "final.pt"


def check_sweep_section(cfg: dict) -> None:
    """The `sweep` section's values, checked before any Ray starts."""
    s = cfg["sweep"]
    cpus, gpus = s["cpus_per_trial"], s["gpus_per_trial"]
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
        raise ConfigError(f"sweep.cpus_per_trial must be a number > 0, got {cpus!r}")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0):
        raise ConfigError(f"sweep.gpus_per_trial must be null (auto) or a number >= 0, got {gpus!r}")
    if s["storage"] is not None and not isinstance(s["storage"], str):
        raise ConfigError(f"sweep.storage must be a folder or null, got {s['storage']!r}")
