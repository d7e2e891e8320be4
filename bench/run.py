"""`bench run`: train (or reuse a finished checkpoint of the same config), sample, store a row."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from bench.checkpoint import load_weights_into
from bench.config import config_hash
from bench.sample import generate, gflops_per_call, save_grid
from bench.setup import build_model, build_schedule, image_geometry, resolve_device
from bench.store import append_row, provenance
from bench.train import train
from methods import build_method


def scale_label(cfg: dict, device: torch.device) -> str:
    """How a result was obtained, e.g. 'cpu-tiny': never to be read as the paper's scale."""
    return f"{device.type}-{cfg['run']['profile']}"


def run(cfg: dict, *, progress: bool = True, force: bool = False) -> dict:
    """The whole pipeline for one cell; returns the row it stored."""
    r, s = cfg["run"], cfg["sample"]
    device = resolve_device(r["device"])
    tick = time.perf_counter()
    checkpoint = train(cfg, progress=progress)
    train_seconds = time.perf_counter() - tick

    method = build_method(r["method"], cfg["method"])
    model = build_model(cfg, method)
    load_weights_into(model, checkpoint, prefer="ema")
    model.to(device)
    schedule = build_schedule(cfg)
    resolution, channels, _ = image_geometry(cfg)
    images, stats = generate(model, schedule, s, r["seed"], (channels, resolution, resolution), device,
                             progress=progress, method=method)

    from bench.data import dataset_checksum

    cell = f"{r['method']}-{cfg['model']['backbone']}-{r['dataset']}-{r['profile']}-{s['sampler']}{s['steps']}-seed{r['seed']}"
    grid = save_grid(images[:64], Path(r["results"]) / "grids" / f"{cell}.png") if s["grid"] else None
    flops = model.backbone.flops_per_part() if _fvcore_available() else None
    row = {
        "experiment": r["experiment"], "method": r["method"], "backbone": cfg["model"]["backbone"],
        "dataset": r["dataset"], "profile": r["profile"], "scale": scale_label(cfg, device),
        "sampler": s["sampler"], "steps": s["steps"], "threshold": "" if s["threshold"] is None else s["threshold"],
        "seed": r["seed"],
        "n_samples": s["n_samples"], "fid": "", "kid": "",
        "layer_ratio": round(stats["layer_ratio"], 6),
        "gflops": round(gflops_per_call(flops, stats["record"]), 4) if flops else "",
        "gflops_convention": "fvcore multiply-adds (1 MAC = 1 flop), attention counted, per network call",
        "seconds_per_image": round(stats["seconds_per_image"], 5), "batch_size": s["batch_size"],
        "mode": s["engine_mode"], "device": str(device), "train_steps": cfg["train"]["steps"],
        "train_seconds_this_call": round(train_seconds, 1),
        "dataset_checksum": dataset_checksum(r["dataset"], cfg["data"]["path"], cfg["data"]["split"]),
        "data_limit": cfg["data"]["limit"] or "", "config_hash": config_hash(cfg),
        "checkpoint": str(checkpoint), "grid": str(grid or ""), **provenance(),
    }
    row["stored"] = append_row(Path(r["results"]) / "runs.csv", row, force=force)
    return row


def _fvcore_available() -> bool:
    try:
        import fvcore  # noqa: F401
        return True
    except ImportError:
        return False
