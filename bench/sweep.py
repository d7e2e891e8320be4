"""Sweeps on Ray Tune: threshold trade-off curves and training grids, one trial per cell.

    bench sweep thresholds --methods deediff,bertxit,calm --dataset mnist --profile tiny
    bench sweep train --methods deediff,bertxit --seeds 0,1 --grid train.lr=1e-3,2e-4

The results store decides what is done, not Ray's experiment state: before anything starts,
cells already in <results>/runs.csv are dropped (bench.run.skip_stored) and finished checkpoints
are reused, so an interrupted sweep, run again, does only the missing cells, and a finished one
starts no Ray at all. A threshold sweep first trains the checkpoints it lacks (one trial per
method), then runs one trial per threshold; every trial measures the full-depth model in its own
process before its threshold (bench.run.evaluate), so each row's speed-up compares like with like.

Without --address a private Ray runtime starts on this machine (bench.ray_runtime): its servers listen on 127.0.0.1
only and it asks for a random token (ray_runtime). With --address the trials spread over an
existing cluster; the results and runs folders must then be on a filesystem every node shares.
"""
from __future__ import annotations

import itertools
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from bench.config import ConfigError, load_config, parse_override, resolve
from bench.ray_runtime import ray_runtime
from bench.thresholds import check_thresholds, parse_thresholds  # noqa: F401  (the command line's grammar)

Echo = Callable[[str], Any]


class SweepError(RuntimeError):
    """Some trials failed; the message names them (their tracebacks are in Ray's output above)."""


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


# ---- the two sweeps -----------------------------------------------------------------------

def sweep_thresholds(config: str | Path | None = None, run: dict | None = None, overrides: list[str] | None = None, *,
                     methods: list[str] | None = None, thresholds: list[float | None] | None = None,
                     address: str | None = None, force: bool = False, quiet: bool = False,
                     echo: Echo = print) -> dict[str, dict]:
    """One trial per (method, threshold) cell not yet stored; trains missing checkpoints first.

    Returns {cell label: the trial's metrics}; raises SweepError after all trials if any failed.
    """
    from bench.run import skip_stored
    from bench.setup import prepare_data
    from methods import build_method

    plan, to_train = {}, {}
    trainer: dict[str, str] = {}  # cell label -> the label whose trial trains its checkpoint (static shares DeeDiff's)
    by_checkpoint: dict[Path, str] = {}
    cells = resolve_cells(config, run, overrides, methods=methods)
    for label, cfg in cells:
        prepare_data(cfg)  # before any trial reads it (a latent dataset's stand-in)
        method = build_method(cfg["run"]["method"], cfg["method"])
        grid = list(thresholds) if thresholds is not None else method_thresholds(method)
        check_thresholds(cfg, method, grid)
        todo = grid if force else skip_stored(cfg, grid)
        checkpoint = _checkpoint(cfg)
        missing = todo and not checkpoint.exists()
        echo(f"{label}: {len(grid)} threshold(s), {len(grid) - len(todo)} already stored, {len(todo)} to measure; "
             f"checkpoint {checkpoint}{' (trained first)' if missing else ''}")
        if missing:
            trainer[label] = by_checkpoint.setdefault(checkpoint, label)
            if trainer[label] == label:  # one trial per checkpoint, however many cells read it
                to_train[label] = _item(cfg)
        for t in todo:
            plan[f"{label} @ {'full' if t is None else t}"] = _item(cfg, threshold=t, checkpoint=str(checkpoint),
                                                                  force=force, method=label)
    if not plan:
        results = cells[0][1]["run"]["results"]
        echo(f"nothing to do: every cell is already in {results}/runs.csv (use --force to re-measure)")
        return {}

    failures: dict[str, str] = {}
    with ray_runtime(address, echo) as cluster:
        settings = _trial_settings(cells[0][1], cluster, local=address is None, echo=echo)
        if to_train:
            trained = _run_trials("train", _train_trial, to_train,
                                  _train_settings(cells[0][1], cluster, local=address is None, echo=echo), quiet, echo)
            failures.update({k: v for k, v in trained.items() if isinstance(v, str)})
            plan = {k: v for k, v in plan.items() if trainer.get(v["method"], v["method"]) not in failures}
        outcome = _run_trials("thresholds", _threshold_trial, plan, settings, quiet, echo) if plan else {}
    failures.update({k: v for k, v in outcome.items() if isinstance(v, str)})
    done = {k: v for k, v in outcome.items() if not isinstance(v, str)}
    if done:
        echo(f"{'cell':44s} {'layers':>7s} {'speedup':>8s} {'s/img':>9s}  stored")
        for label, m in done.items():
            echo(f"{label:44s} {m['layer_ratio']:7.3f} {m['measured_speedup']:8.2f} {m['seconds_per_image']:9.4f}  "
                 f"{'yes' if m['stored'] else 'already'}")
    _raise_failures(failures)
    return done


def sweep_train(config: str | Path | None = None, run: dict | None = None, overrides: list[str] | None = None, *,
                methods: list[str] | None = None, datasets: list[str] | None = None, seeds: list[int] | None = None,
                grid: dict[str, list] | None = None, address: str | None = None, quiet: bool = False,
                echo: Echo = print) -> dict[str, dict]:
    """Train every configuration of the grid that has no final checkpoint yet, one trial each."""
    plan, seen = {}, {}
    cells = resolve_cells(config, run, overrides, methods=methods, datasets=datasets, seeds=seeds, grid=grid)
    from bench.setup import prepare_data

    for label, cfg in cells:
        prepare_data(cfg)
        checkpoint = _checkpoint(cfg)
        if checkpoint.exists():
            echo(f"{label}: already trained ({checkpoint})")
        elif checkpoint in seen:  # a grid key that does not change training (sample.*, run.experiment, ...)
            echo(f"{label}: same model as {seen[checkpoint]}")
        else:
            seen[checkpoint] = label
            plan[label] = _item(cfg)
    if not plan:
        echo("nothing to train: every configuration has its final checkpoint")
        return {}
    with ray_runtime(address, echo) as cluster:
        settings = _train_settings(cells[0][1], cluster, local=address is None, echo=echo)
        outcome = _run_trials("train", _train_trial, plan, settings, quiet, echo)
    done = {k: v for k, v in outcome.items() if not isinstance(v, str)}
    for label, m in done.items():
        echo(f"{label}: {m.get('checkpoint')} ({m.get('train_seconds', 0):.1f} s)")
    _raise_failures({k: v for k, v in outcome.items() if isinstance(v, str)})
    return done


def _raise_failures(failures: dict[str, str]) -> None:
    if failures:
        lines = "\n".join(f"  {label}: {error}" for label, error in failures.items())
        raise SweepError(f"{len(failures)} trial(s) failed (run the command again to retry only the missing "
                         f"cells):\n{lines}")


# ---- trials (they run in Ray workers) -----------------------------------------------------

def _enter_trial(item: dict) -> None:
    """Tune starts a trial in its own folder: go back to the folder the paths are relative to."""
    import torch

    if os.path.isdir(item["cwd"]):
        os.chdir(item["cwd"])
    torch.set_num_threads(item["threads"])


def _train_trial(config: dict, plan: dict) -> None:
    from ray import tune

    from bench.train import train

    item = plan[config["cell"]]
    _enter_trial(item)
    tick = time.perf_counter()
    path = train(item["cfg"], progress=False)
    tune.report({"train_seconds": round(time.perf_counter() - tick, 2), "checkpoint": str(path),
                 "finished": int(path.name == "final.pt")})


def _threshold_trial(config: dict, plan: dict) -> None:
    from ray import tune

    from bench.run import evaluate

    item = plan[config["cell"]]
    _enter_trial(item)
    row = evaluate(item["cfg"], Path(item["checkpoint"]), [item["threshold"]], progress=False,
                   force=item["force"])[-1]
    tune.report({"layer_ratio": row["layer_ratio"], "measured_speedup": row["measured_speedup"],
                 "seconds_per_image": row["seconds_per_image"], "stored": int(bool(row["stored"]))})


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


def trial_resources(cfg: dict, cluster: dict, *, local: bool = True, echo: Echo = print) -> dict:
    """{"cpu": n, "gpu": m} per trial from the `sweep` section, never asking for a GPU the cluster lacks."""
    check_sweep_section(cfg)
    cpus, gpus = cfg["sweep"]["cpus_per_trial"], cfg["sweep"]["gpus_per_trial"]
    if gpus is None:
        gpus = 1 if cluster["gpus"] >= 1 else 0
    elif gpus > 0 and cluster["gpus"] == 0:
        echo(f"warning: sweep.gpus_per_trial={gpus} but the Ray cluster has no GPU; trials run on the CPU")
        gpus = 0
    if local and cpus > cluster["cpus"]:  # a trial that can never be placed would wait forever
        raise ConfigError(f"sweep.cpus_per_trial={cpus} but this machine offers Ray {cluster['cpus']:g} CPUs")
    if local and gpus > cluster["gpus"]:
        raise ConfigError(f"sweep.gpus_per_trial={gpus} but this machine has {cluster['gpus']:g} GPUs")
    return {"cpu": cpus, "gpu": gpus}


def _trial_settings(cfg: dict, cluster: dict, *, local: bool, echo: Echo) -> dict:
    resources = trial_resources(cfg, cluster, local=local, echo=echo)
    device = cfg["run"]["device"]
    if resources["gpu"] == 0 and device.startswith("cuda"):
        raise ConfigError(f"--device {device} asks for a GPU but the trials get none (sweep.gpus_per_trial, "
                          f"or the cluster has no GPU); use --device auto or cpu")
    storage = cfg["sweep"]["storage"] or Path(cfg["run"]["runs_dir"]) / "ray"
    return {"resources": resources, "storage": str(Path(storage).resolve()), "threads": max(1, int(resources["cpu"])),
            # a trial without a GPU must not pick one up through device "auto" (Ray only hides GPUs from
            # trials that ask for some)
            "device": "cpu" if resources["gpu"] == 0 and device == "auto" else device}


def _train_settings(cfg: dict, cluster: dict, *, local: bool, echo: Echo) -> dict:
    """Training trials' settings. One process per trial (train.num_workers 1) as any trial's; with
    train.num_workers > 1 a trial is a Ray Train run (bench.distributed): the trial itself reserves
    nothing, its workers reserve train.cpus_per_worker CPUs each and, on GPUs, one GPU each, and on this
    machine only as many trials run at once as their workers fit (a cluster queues them itself)."""
    workers = cfg["train"]["num_workers"]
    if workers == 1:
        return _trial_settings(cfg, cluster, local=local, echo=echo)
    from bench.distributed import worker_resources

    check_sweep_section(cfg)
    per_worker = worker_resources(cfg, cluster, cfg["run"]["device"])
    need = workers * per_worker["cpu"]
    if local and need > cluster["cpus"]:
        raise ConfigError(f"train.num_workers={workers} workers of train.cpus_per_worker={per_worker['cpu']:g} CPUs "
                          f"need {need:g} CPUs per trial; this machine offers Ray {cluster['cpus']:g}")
    storage = cfg["sweep"]["storage"] or Path(cfg["run"]["runs_dir"]) / "ray"
    # Tune refuses an empty request: the trial asks for a token 1 MiB of memory, no CPU or GPU
    return {"resources": {"cpu": 0, "gpu": 0, "memory": 2**20}, "storage": str(Path(storage).resolve()), "threads": 1,
            "device": cfg["run"]["device"], "workers": (workers, per_worker),
            "max_concurrent": max(1, int(cluster["cpus"] // need)) if local else None}


def _run_trials(kind: str, trainable, plan: dict[str, dict], settings: dict, quiet: bool,
                echo: Echo) -> dict[str, dict | str]:
    """One Tune trial per plan entry; returns {label: metrics} or {label: error text}."""
    from ray import tune

    for item in plan.values():
        item["threads"] = settings["threads"]
        item["cfg"] = {**item["cfg"], "run": {**item["cfg"]["run"], "device": settings["device"]}}
    name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    res = settings["resources"]
    if "workers" in settings:
        workers, per_worker = settings["workers"]
        each = f"{workers} Ray Train workers each ({per_worker['cpu']:g} CPU and {per_worker['gpu']} GPU per worker)"
    else:
        each = f"{res['cpu']:g} CPU and {res['gpu']:g} GPU each"
    echo(f"{kind}: {len(plan)} trial(s), {each}; Tune state in {settings['storage']}/{name}")
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(trainable, plan=plan), settings["resources"]),
        param_space={"cell": tune.grid_search(list(plan))},
        tune_config=tune.TuneConfig(trial_dirname_creator=lambda trial: f"{kind}_{trial.trial_id}",
                                    max_concurrent_trials=settings.get("max_concurrent")),
        run_config=tune.RunConfig(name=name, storage_path=settings["storage"], verbose=0 if quiet else 1,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = tuner.fit()
    outcome: dict[str, dict | str] = {}
    for i in range(len(grid)):
        result = grid[i]
        if not result.config:  # a trial stopped (Ctrl-C) before it began: it reports no config
            continue
        label = result.config["cell"]
        if result.error is not None:
            text = str(result.error).strip().splitlines()
            outcome[label] = text[-1] if text else type(result.error).__name__
        else:
            outcome[label] = dict(result.metrics or {})
    for label in plan:  # a trial Tune never ran (interrupted)
        outcome.setdefault(label, "did not run (interrupted?); run the same command again to do what is missing")
    return outcome
