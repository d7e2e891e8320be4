"""Sweeps on Ray Tune: threshold trade-off curves and training grids, one trial per cell.

    bench sweep thresholds --methods deediff,bertxit,calm --dataset mnist --profile tiny
    bench sweep train --methods deediff,bertxit --seeds 0,1 --grid train.lr=1e-3,2e-4

The results store decides what is done, not Ray's experiment state: before anything starts,
cells already in <results>/runs.csv are dropped (bench.evaluate.measure.skip_stored) and finished checkpoints
are reused, so an interrupted sweep, run again, does only the missing cells, and a finished one
starts no Ray at all. A threshold sweep first trains the checkpoints it lacks (one trial per
method), then runs one trial per threshold; every trial measures the full-depth model in its own
process before its threshold (bench.evaluate.measure.measure), so each row's speed-up compares like with like.

Without --address a private Ray runtime starts on this machine (bench.ray_runtime): its servers listen on 127.0.0.1
only and it asks for a random token (ray_runtime). With --address the trials spread over an
existing cluster; the results and runs folders must then be on a filesystem every node shares.

The parts: `plan` (the command line's lists and grids, the cells; no Ray), `trials` (the trial
functions, their resources, running them on Ray Tune), bench.ray_runtime (starting or joining Ray),
and here the two sweeps that join them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bench.ray_runtime import ray_runtime
from bench.sweep.plan import (_checkpoint, _item, check_sweep_section, grid_points, method_thresholds,  # noqa: F401
                              parse_grid, parse_list, parse_seeds, resolve_cells)
from bench.sweep.trials import _run_trials, _threshold_trial, _train_settings, _train_trial, _trial_settings
from bench.sweep.trials import trial_resources  # noqa: F401  (re-exported: the sweep's public names)
from bench.thresholds import check_thresholds, parse_thresholds  # noqa: F401  (the command line's grammar)

Echo = Callable[[str], Any]


class SweepError(RuntimeError):
    """Some trials failed; the message names them (their tracebacks are in Ray's output above)."""


# ---- the two sweeps -----------------------------------------------------------------------

def sweep_thresholds(config: str | Path | None = None, run: dict | None = None, overrides: list[str] | None = None, *,
                     methods: list[str] | None = None, thresholds: list[float | None] | None = None,
                     address: str | None = None, force: bool = False, quiet: bool = False,
                     echo: Echo = print) -> dict[str, dict]:
    """One trial per (method, threshold) cell not yet stored; trains missing checkpoints first.

    Returns {cell label: the trial's metrics}; raises SweepError after all trials if any failed.
    """
    from bench.evaluate.measure import skip_stored
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
