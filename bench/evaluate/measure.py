"""Measuring cells: one trained model at several thresholds in one process, full depth first, so
that every row carries its speed-up measured against full depth on the same machine in the same run
(realised) next to the theoretical one (from GFLOPs); plus the side analyses a cell stores (per-call
exit histograms, the trajectory's error, each exit's error along a full-depth trajectory, the loss
per timestep, uncertainty maps) and FID.

`measure` is what `bench eval` and every threshold-sweep trial run; bench.run orchestrates (train or
reuse, then measure).
"""
from __future__ import annotations

import hashlib
import json
from functools import partial
from pathlib import Path

import torch

from bench.cell import CELL_KEY, Cell, engine_label, ordered_row
from bench.checkpoint import check_identity, load_checkpoint, load_weights_into
from bench.conditioning import build_conditioning
from bench.config import config_hash, inference_options
from bench.sample import generate, gflops_per_call, save_grid
from bench.setup import build_model, build_schedule, image_geometry, prepare_data, resolve_device
from bench.store import append_row, has_cell, provenance
from bench.thresholds import check_thresholds
from bench.train import has_extras, weights_config
from methods import build_method


def row_hash(cfg: dict, *, rule: bool = True) -> str:
    """The config hash a result row carries: the run's own, or, for a method that evaluates another
    method's weights (static exits of DeeDiff), a hash of its own and those weights' configs, so that
    retrained weights make new cells rather than collide with stored ones. An exit rule away from its
    defaults (bench.config.INFERENCE_METHOD_KEYS: out of the training hash) is hashed in too, so that
    its cells are their own rather than the default rule's; `rule=False`: the default rule's hash (the
    full-depth analyses, which no exit rule changes)."""
    source = weights_config(cfg)
    text = config_hash(cfg) if source is cfg else f"{config_hash(cfg)}+{config_hash(source)}"
    options = inference_options(cfg) if rule else {}
    if options:
        text += "+" + json.dumps(options, sort_keys=True)
    return text if source is cfg and not options else hashlib.sha256(text.encode()).hexdigest()[:12]


def scale_label(cfg: dict, device: torch.device) -> str:
    """How a result was obtained, e.g. 'cpu-tiny': never to be read as the paper's scale."""
    return f"{device.type}-{cfg['run']['profile']}"


def measure(cfg: dict, checkpoint: Path, thresholds: list[float | None], *, progress: bool = True,
             force: bool = False, extra: dict | None = None) -> list[dict]:
    """Sample at each threshold (None = full depth, measured first as the reference); one row each."""
    r, s = cfg["run"], cfg["sample"]
    check_results(Path(r["results"]))  # a damaged results file stops the run before anything is measured
    prepare_data(cfg)
    device = resolve_device(r["device"])
    method = build_method(r["method"], cfg["method"])
    model = build_model(cfg, method)
    thresholds = [None if t is None else float(t) for t in thresholds]  # one spelling per cell: 6 and 6.0 alike
    check_thresholds(cfg, method, thresholds)  # again now that the backbone set the range (static exits)
    state = load_checkpoint(checkpoint)
    check_identity(state, weights_config(cfg), checkpoint)  # a file copied in from another run is refused
    load_weights_into(model, checkpoint, prefer="ema", drop_extras=method.weights_from is not None,
                      fresh_extras=False, state=state)
    model.to(device).eval()
    schedule = build_schedule(cfg)
    resolution, channels, _ = image_geometry(cfg)
    shape = (channels, resolution, resolution)
    flops = model.backbone.flops_per_part() if _fvcore_available() else None
    conditioning = build_conditioning(cfg)
    latent = latent_pipeline(cfg, device)

    from bench.data import dataset_checksum

    common = {
        "experiment": r["experiment"], "method": r["method"], "backbone": cfg["model"]["backbone"],
        "dataset": r["dataset"], "profile": r["profile"], "scale": scale_label(cfg, device),
        "sampler": s["sampler"], "steps": s["steps"], "seed": r["seed"], "n_samples": s["n_samples"],
        "batch_size": s["batch_size"], "mode": engine_label(s), "device": str(device),
        "train_steps": cfg["train"]["steps"],
        # steps that trained only the method's modules on the frozen EMA backbone (bench/train.py), if any
        "exit_calibration_steps": cfg["train"]["exit_calibration_steps"] if has_extras(model) or method.weights_from
        else 0,
        "dataset_checksum": dataset_checksum(r["dataset"], cfg["data"]["path"], cfg["data"]["split"]),
        "data_limit": cfg["data"]["limit"] or "", "config_hash": row_hash(cfg), "checkpoint": str(checkpoint),
        # The method's resolved hyper-parameters, so a reporter can tell ablation variants apart.
        "method_options": json.dumps({k: v for k, v in sorted({**cfg["method"], **method.row_options()}.items())
                                      if k not in ("threshold", "thresholds")}, separators=(",", ":")),
        "sampler_options": json.dumps(s["options"], sort_keys=True, separators=(",", ":")),
        "init_from": cfg["model"]["init_from"] or "",
        "condition": cfg["data"]["condition"], "guidance_scale": "" if s["guidance_scale"] is None else s["guidance_scale"],
        "guidance_exit": s["guidance_exit"] if conditioning is not None and s["guidance_scale"] else "",
        # network passes per sampling call and sample: 2 with guidance (conditional + unconditional halves);
        # gflops below is per pass
        "passes_per_call": 2 if conditioning is not None and s["guidance_scale"] else 1,
        **(latent.columns if latent else {}),
    }
    reference = _reference(cfg, device, progress) if cfg["eval"]["fid"] else None
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection stay out of the timings
        k = min(s["batch_size"], 8)
        model.backbone(torch.zeros(k, *shape, device=device), torch.full((k,), 500.0, device=device),
                       None if conditioning is None else conditioning.sampling(torch.arange(k), r["seed"], device))
    sample_once = partial(_sample_once, model, method, schedule, cfg, shape=shape, device=device, flops=flops,
                      progress=progress, conditioning=conditioning, decode=latent.decode if latent else None)
    full = sample_once(None)
    # The full-depth analyses depend on the model, not the threshold or the exit rule: made once (keyed by
    # the default rule's full-depth cell), not in every sweep trial or rule variant.
    cell = Cell.of(cfg, None, config_hash=row_hash(cfg))
    results, full_id = Path(r["results"]), Cell.of(cfg, None, config_hash=row_hash(cfg, rule=False)).run_id
    if cfg["eval"]["layer_errors"] and (force or not _has_run(results / "layer_mse.csv", full_id)):
        _store_layer_errors(cfg, model, method, schedule, shape, device, full_id, conditioning)
    if cfg["eval"]["loss_buckets"] and (force or not _has_run(results / "loss_per_timestep.csv", full_id)):
        _store_timestep_loss(cfg, model, schedule, device, full_id, conditioning)
    # The full-depth row is measured anyway (the reference of every speed-up): store it too, once, so
    # that "without exiting" and the report's FID-tolerance rule always have the same model's baseline.
    if None not in thresholds and (force or skip_stored(cfg, [None])):
        thresholds = [None, *thresholds]
    rows = []
    for threshold in thresholds:
        m = full if threshold is None else sample_once(threshold)
        here = cell.at(threshold)
        grid = save_grid(m["images"][:64], here.grid_path(results)) if s["grid"] else None
        row = {
            **common, "threshold": "" if threshold is None else threshold,
            "layer_ratio": round(m["layer_ratio"], 6),
            "gflops": "" if m["gflops"] is None else round(m["gflops"], 5),
            "gflops_convention": "fvcore multiply-adds (1 MAC = 1 flop), attention counted, per network call",
            "seconds_per_image": round(m["seconds_per_image"], 6),
            "full_seconds_per_image": round(full["seconds_per_image"], 6),
            "measured_speedup": round(full["seconds_per_image"] / m["seconds_per_image"], 4),
            "theoretical_speedup": "" if m["gflops"] is None else round(full["gflops"] / m["gflops"], 4),
            "grid": str(grid or ""),
            **_fid_columns(m["images"], reference, cfg, device, progress, here.run_id),
            **(extra or {}), **provenance(),
        }
        row = ordered_row({**row, "run_id": here.run_id})
        # the per-call and trajectory rows first, the runs.csv row last: a cell is stored (and skipped by a
        # rerun) only once all its files are; a kill in between leaves it to be measured again, whole
        _store_per_step(cfg, model, m, full, row["run_id"])
        row["stored"] = append_row(Path(r["results"]) / "runs.csv", row, force=force)
        rows.append(row)
    return rows


class LatentPipeline:
    """A latent dataset's autoencoder (decodes samples to images) and the labels result rows carry."""

    def __init__(self, codec, columns: dict):
        self.codec, self.columns = codec, columns

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(latents)


def latent_pipeline(cfg: dict, device: torch.device) -> LatentPipeline | None:
    """None for a pixel-space dataset; else the autoencoder recorded with the prepared latents."""
    from bench.data import is_latent, latent_description
    from bench.latent.autoencoder import latent_codec

    d = cfg["data"]
    if not is_latent(d["name"]):
        return None

    codec = latent_codec(d["name"], d["path"])
    codec.to(device)
    return LatentPipeline(codec, latent_description(d["name"], d["path"]))


def _has_run(path: Path, run_id: str) -> bool:
    from bench.store import read_rows

    return any(row.get("run_id") == run_id for row in read_rows(path))


def _store_per_step(cfg: dict, model, measured: dict, full: dict, run_id: str) -> None:
    """Exit histograms per network call, and the trajectory's distance from the full model's per step."""
    from bench.evaluate.trajectory import per_call_rows, trajectory_rows
    from bench.store import append_rows

    results = Path(cfg["run"]["results"])
    append_rows(results / "per_call.csv", per_call_rows(measured["record"], model.backbone.num_exits, run_id),
                force=True, key=("run_id", "call"))
    trajectory = trajectory_rows(measured["trajectory"].states, full["trajectory"].states,
                                 measured["trajectory"].times, run_id)
    append_rows(results / "trajectory.csv", trajectory, force=True, key=("run_id", "step"))


def _store_layer_errors(cfg: dict, model, method, schedule, shape, device, run_id: str, conditioning=None) -> None:
    """Each exit's prediction against the final one along a full-depth trajectory (paper Fig. 1), and,
    for methods with uncertainty maps, the maps at five calls along it (Fig. 4) in uncertainty/<run_id>.npz."""
    from bench.diffusion import SAMPLERS, NoiseSource
    from bench.evaluate.trajectory import LayerErrorProbe
    from bench.store import append_rows

    s = cfg["sample"]
    n = min(s["n_samples"], s["batch_size"], 16)
    # conditional models: the samples' own conditions, without guidance (each exit against the final exit
    # of the same conditional pass)
    cond = None if conditioning is None else conditioning.sampling(torch.arange(n), cfg["run"]["seed"], device)
    probe = LayerErrorProbe(model, cond)
    with torch.no_grad():
        SAMPLERS.get(s["sampler"])(probe, schedule, NoiseSource(cfg["run"]["seed"], range(n)), shape, s["steps"],
                                   device=device, **s["options"])
    append_rows(Path(cfg["run"]["results"]) / "layer_mse.csv", probe.as_rows(run_id), force=True,
                key=("run_id", "call"))
    import numpy as np

    from bench.atomic import atomic_write
    from bench.evaluate.trajectory import uncertainty_snapshots

    calls = torch.linspace(0, len(probe.inputs) - 1, min(5, len(probe.inputs))).round().long().unique()
    snapshots = uncertainty_snapshots(method, model, [probe.inputs[c] for c in calls.tolist()], cond=cond)
    if snapshots is not None:  # a method with uncertainty maps (DeeDiff)
        atomic_write(Path(cfg["run"]["results"]) / "uncertainty" / f"{run_id}.npz",
                     lambda f: np.savez_compressed(f, calls=calls.numpy(), **snapshots))


def _store_timestep_loss(cfg: dict, model, schedule, device, run_id: str, conditioning=None) -> None:
    """Each exit's L_simple per bucket of diffusion time on training images (paper Fig. 3)."""
    from bench.evaluate.trajectory import timestep_loss_rows
    from bench.setup import build_train_dataset
    from bench.store import append_rows

    dataset = build_train_dataset(cfg)
    n = min(len(dataset), cfg["eval"]["loss_images"])
    items = [dataset[i] for i in torch.linspace(0, len(dataset) - 1, n).long().tolist()]
    images = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
    cond = None if conditioning is None else conditioning.exact(torch.stack([torch.as_tensor(y) for _, y in items]),
                                                                 device)
    rows = timestep_loss_rows(model, schedule, images, cfg["eval"]["loss_buckets"], cfg["run"]["seed"], run_id, cond)
    append_rows(Path(cfg["run"]["results"]) / "loss_per_timestep.csv", rows, force=True, key=("run_id", "bucket"))


def _sample_once(model, method, schedule, cfg, threshold, *, shape, device, flops, progress, conditioning=None,
             decode=None) -> dict:
    from bench.evaluate.trajectory import TrajectoryRecorder

    sample_cfg = {**cfg["sample"], "threshold": threshold}
    trajectory = TrajectoryRecorder()
    images, stats = generate(model, schedule, sample_cfg, cfg["run"]["seed"], shape, device, progress=progress,
                             method=method, callback=trajectory, conditioning=conditioning, decode=decode)
    decide = method.decide_gmacs(model) if threshold is not None else None
    gflops = gflops_per_call(flops, stats["record"], decide) if flops else None
    return {"images": images, "gflops": gflops, "trajectory": trajectory, **stats}


def _reference(cfg: dict, device: torch.device, progress: bool):
    """Reference Inception statistics of the configured dataset subset (computed once, cached)."""
    from bench.evaluate import reference_statistics

    e, d = cfg["eval"], cfg["data"]
    return reference_statistics(d["name"], d["path"], e["reference_split"], d["resolution"], limit=e["reference_limit"],
                                per_class=e["reference_per_class"], device=device, batch_size=e["fid_batch_size"],
                                progress=progress)


def _fid_columns(images, reference, cfg: dict, device: torch.device, progress: bool, run_id: str) -> dict:
    """fid, kid and how they were obtained; empty columns when FID is off."""
    if reference is None:
        return {"fid": "", "kid": ""}
    from bench.evaluate import fid_kid

    pngs = Path(cfg["run"]["results"]) / "png" / run_id if cfg["eval"]["save_png"] else None
    result = fid_kid(images, reference, device=device, batch_size=cfg["eval"]["fid_batch_size"], progress=progress,
                     save_png_dir=pngs)
    meta = reference.meta
    return {"fid": round(result["fid"], 4), "kid": round(result["kid_mean"], 6), "kid_std": round(result["kid_std"], 6),
            "fid_n_reference": result["n_reference"], "fid_method": result["fid_method"],
            "fid_reference": f"{meta.get('split', '')}:{meta.get('subset', '')}"}


def _fvcore_available() -> bool:
    try:
        import fvcore  # noqa: F401
        return True
    except ImportError:
        return False


def check_results(results: Path) -> None:
    """Read every results file a cell writes, so that a damaged one raises ResultsError now."""
    from bench.store import read_rows

    read_rows(results / "runs.csv", CELL_KEY)
    for name, key in (("per_call.csv", ("run_id", "call")), ("trajectory.csv", ("run_id", "step")),
                      ("layer_mse.csv", ("run_id", "call")), ("loss_per_timestep.csv", ("run_id", "bucket"))):
        read_rows(results / name, key)


def skip_stored(cfg: dict, thresholds: list) -> list:
    """The thresholds whose cells are not yet in the results store."""
    cell = Cell.of(cfg, None, config_hash=row_hash(cfg))
    path = Path(cfg["run"]["results"]) / "runs.csv"
    return [t for t in thresholds if not has_cell(path, cell.at(t).key)]
