"""A sweep's runtime on Ray Tune: the trial functions (they run in Ray workers), the resources each
trial asks for, and running a plan of trials (bench.ray_runtime starts or joins Ray)."""
from __future__ import annotations

import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from bench.config import ConfigError
from bench.ray_runtime import ray_storage
from bench.sweep.plan import check_sweep_section

Echo = Callable[[str], Any]

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

    from bench.evaluate.measure import measure

    item = plan[config["cell"]]
    _enter_trial(item)
    row = measure(item["cfg"], Path(item["checkpoint"]), [item["threshold"]], progress=False,
                   force=item["force"])[-1]
    tune.report({"layer_ratio": row["layer_ratio"], "measured_speedup": row["measured_speedup"],
                 "seconds_per_image": row["seconds_per_image"], "stored": int(bool(row["stored"]))})


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
    return {"resources": resources, "storage": ray_storage(cfg), "threads": max(1, int(resources["cpu"])),
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
    # Tune refuses an empty request: the trial asks for a token 1 MiB of memory, no CPU or GPU
    return {"resources": {"cpu": 0, "gpu": 0, "memory": 2**20}, "storage": ray_storage(cfg), "threads": 1,
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
