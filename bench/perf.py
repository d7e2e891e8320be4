"""`bench perf`: is an early exit's saving real on the clock? A benchmark, not a test.

In one process, as ratios against the full model measured alongside:

- sampling: seconds per image of the full model and of every early-exit method at several
  thresholds (static exits after blocks 3, 6 and 9 for exits whose position is known in advance), at
  each batch size; the realised speed-up against the theoretical one from the blocks that ran and
  from GMACs (the methods' exit modules counted); where nothing exits, the cost of deciding;
- training: seconds per step of every method against the baseline's;
- FID: Inception feature throughput of the harness's extractor (batch norms folded, channels-last) against
  torch-fidelity's own extractor on the same images, and the largest difference of their features.

Repeats are interleaved (case A, B, C, A, B, C, ...) so that a slow moment of the machine is shared by
all cases; a measured speed-up is the median over repeats of the ratio to the full-depth run of the same
round (`paired_speedup`); rows hold the median and the spread (min, max) and name the machine. Random weights by
default (exit positions then follow from thresholds that force them); `init` loads a checkpoint's
backbone into every model (and a DeeDiff checkpoint's UEMs into DeeDiff's).
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from bench.config import load_config, resolve
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel
from bench.sample import gflops_per_call
from bench.setup import build_model, build_schedule, image_geometry, prepare_dataset, resolve_device
from methods import build_method

# (label, method, threshold): what is timed at every batch size. With random weights DeeDiff's and
# BERxiT's signals sit near 0.5, so threshold 0 never exits (the cost of deciding) and 1 exits as early
# as the rule allows; CALM's consistency of two successive exits exits at once at 0 and never at 1.
SAMPLING_CASES = (
    ("full depth", "baseline", None),
    ("deediff, nothing exits", "deediff", 0.0),
    ("deediff, exits early", "deediff", 1.0),
    ("bertxit, nothing exits", "bertxit", 0.0),
    ("bertxit, exits early", "bertxit", 1.0),
    ("calm, nothing exits", "calm", 1.0),
    ("calm, exits early", "calm", 0.0),
    ("static, after block 3", "static", 3.0),
    ("static, after block 6", "static", 6.0),
    ("static, after block 9", "static", 9.0),
)
TRAINING_METHODS = ("baseline", "deediff", "bertxit", "calm", "static")


def machine() -> str:
    """The machine the numbers belong to, in words."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    return f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def _config(method: str, backbone: str, dataset: str, kwargs: dict, device: str) -> dict:
    return resolve(load_config(), run={"method": method, "dataset": dataset, "profile": "tiny", "device": device},
                   overrides={"model.backbone": backbone, "model.kwargs": kwargs, "model.init_from": None,
                              **({"method.weights": "own"} if method == "static" else {})})


def _models(backbone: str, dataset: str, kwargs: dict, device: torch.device, init: str | None, methods) -> dict:
    """One model per method, the same backbone weights in all (random, seed 0, or `init`'s)."""
    from bench.checkpoint import load_weights_into

    out = {}
    for name in methods:
        cfg = _config(name, backbone, dataset, kwargs, str(device))
        method = build_method(name, cfg["method"])
        torch.manual_seed(0)
        model = build_model(cfg, method)
        if init:
            load_weights_into(model, init, drop_extras=True)
        out[name] = (cfg, method, model.to(device).eval())
    return out


def _interleaved(fns: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up: first-call allocations and kernel choice stay out of the timings
        fn()
    for _ in range(repeats):
        for key, fn in fns.items():
            _sync(device)
            tick = time.perf_counter()
            fn()
            _sync(device)
            times[key].append(time.perf_counter() - tick)
    return times


def paired_speedup(full: list[float], case: list[float]) -> float:
    """Median over repeats of full / case, each repeat's case against the full run just before it: a slow
    stretch of the machine (shared by the neighbours in the interleaved order) cancels in each ratio,
    where a ratio of medians would compare different moments."""
    return statistics.median(f / c for f, c in zip(full, case))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": len(values)}


def sampling_rows(models: dict, batch_sizes: list[int], steps: int, repeats: int, device: torch.device,
                  precision: str = "fp32", echo=print) -> list[dict]:
    rows = []
    for batch in batch_sizes:
        engines, runs = {}, {}
        for label, name, threshold in SAMPLING_CASES:
            cfg, method, model = models[name]
            shape = image_geometry(cfg)
            shape = (shape[1], shape[0], shape[0])
            schedule = build_schedule(cfg)
            sampler = SAMPLERS.get(cfg["sample"]["sampler"])
            noise = NoiseSource(0, range(batch))

            def run(model=model, method=method, threshold=threshold, sampler=sampler, schedule=schedule,
                    shape=shape, label=label):
                engine = EarlyExitModel(model, method, threshold=threshold)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    sampler(engine, schedule, noise, shape, steps, device=device, **cfg["sample"]["options"])
                engines[label] = engine

            runs[label] = run
        times = _interleaved(runs, repeats, device)
        full_label = SAMPLING_CASES[0][0]
        full_times = times[full_label]
        full_model = models["baseline"][2]
        flops = full_model.backbone.flops_per_part()
        full_gmacs = gflops_per_call(flops, engines[full_label].record)
        for label, name, threshold in SAMPLING_CASES:
            _, method, model = models[name]
            record = engines[label].record
            blocks_full = len(torch.cat(record.exit_blocks)) * model.backbone.num_exits
            decide = method.decide_gmacs(model) if threshold is not None else None
            gmacs = gflops_per_call(flops, record, decide)
            spread = _spread([t / batch for t in times[label]])
            rows.append({"kind": "sampling", "case": label, "method": name,
                         "threshold": "" if threshold is None else threshold, "batch_size": batch,
                         "steps": steps, "precision": precision, "layer_ratio": round(record.layer_ratio(
                             model.backbone.num_exits), 4),
                         "seconds_per_image": round(spread["median"], 6), "seconds_min": round(spread["min"], 6),
                         "seconds_max": round(spread["max"], 6), "repeats": spread["repeats"],
                         "measured_speedup": round(paired_speedup(full_times, times[label]), 4),
                         "speedup_from_blocks": round(blocks_full / max(record.blocks_run, 1), 4),
                         "speedup_from_gmacs": round(full_gmacs / gmacs, 4), "gmacs_per_call": round(gmacs, 5)})
            echo(f"batch {batch:4d}  {label:24s} layers {rows[-1]['layer_ratio']:.3f}  "
                 f"{rows[-1]['seconds_per_image'] * 1e3:8.2f} ms/img  measured {rows[-1]['measured_speedup']:5.2f}x  "
                 f"blocks {rows[-1]['speedup_from_blocks']:5.2f}x  GMACs {rows[-1]['speedup_from_gmacs']:5.2f}x")
    return rows


def training_rows(models: dict, batch: int, repeats: int, device: torch.device, echo=print) -> list[dict]:
    fns = {}
    for name in TRAINING_METHODS:
        cfg, method, model = models[name]
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        res, channels, _ = image_geometry(cfg)
        x = torch.randn(batch, channels, res, res, device=device)
        noise = torch.randn_like(x)
        t = torch.rand(batch, device=device) * 0.999 + 0.001
        method.diffusion_schedule = build_schedule(cfg)
        model_t = method.diffusion_schedule.model_time(t.cpu()).to(device)

        def step(model=model, method=method, optimizer=optimizer, x=x, noise=noise, model_t=model_t):
            loss, _ = method.loss(model, x, model_t, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        fns[name] = step
    times = _interleaved(fns, repeats, device)
    rows = []
    for name in TRAINING_METHODS:
        spread = _spread(times[name])
        rows.append({"kind": "training", "case": f"{name} training step", "method": name, "batch_size": batch,
                     "seconds_per_step": round(spread["median"], 5), "seconds_min": round(spread["min"], 5),
                     "seconds_max": round(spread["max"], 5), "repeats": spread["repeats"],
                     # paired, as the sampling rows: each repeat's step against the baseline's just before it
                     "step_time_vs_baseline": round(statistics.median(
                         c / b for b, c in zip(times["baseline"], times[name])), 4)})
        echo(f"train batch {batch}  {name:10s} {spread['median'] * 1e3:8.1f} ms/step  "
             f"{rows[-1]['step_time_vs_baseline']:.2f}x the baseline's")
    for _, _, model in models.values():
        model.eval()
    return rows


def inception_rows(n: int, batch: int, repeats: int, device: torch.device, echo=print) -> list[dict]:
    """The harness's extractor (batch norms folded, channels-last) against torch-fidelity's as it comes,
    same weights, same uint8 images: throughput and the largest relative difference of the 2048-d features."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from bench.evaluate.fid import FEATURE, feature_extractor
    from bench.evaluate.inception import ensure_inception_weights

    ours = feature_extractor(device)
    plain = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                        feature_extractor_weights_path=str(ensure_inception_weights())).to(device).eval()
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 28, 28), generator=gen, dtype=torch.uint8).to(device)
    feats = {}

    def extract(model, key):
        def run():
            with torch.inference_mode():
                feats[key] = torch.cat([model(images[i:i + batch])[0] for i in range(0, n, batch)]).double()
        return run

    harness = "harness (BN folded, channels-last)"
    times = _interleaved({"torch-fidelity": extract(plain, "torch-fidelity"), harness: extract(ours, harness)},
                         repeats, device)
    ref = feats["torch-fidelity"]
    rows = []
    for key, values in times.items():
        spread = _spread(values)
        diff = float((feats[key] - ref).abs().max() / ref.abs().max())
        rows.append({"kind": "inception", "case": key, "batch_size": batch, "images": n,
                     "images_per_s": round(n / spread["median"], 2), "seconds_min": round(spread["min"], 4),
                     "seconds_max": round(spread["max"], 4), "repeats": spread["repeats"],
                     "speedup_vs_torch_fidelity": round(paired_speedup(times["torch-fidelity"], values), 4),
                     "max_relative_feature_difference": f"{diff:.2e}"})
        echo(f"inception {key:24s} {rows[-1]['images_per_s']:7.1f} img/s  max rel. feature diff {diff:.1e}")
    return rows


def run_perf(batch_sizes: list[int], *, steps: int = 10, repeats: int = 5, backbone: str = "uvit_tiny",
             dataset: str = "mnist", kwargs: dict | None = None, device: str = "auto", init: str | None = None,
             precision: str = "fp32", train_batch: int = 64, inception_images: int = 64, results: str | Path = "results",
             echo=print) -> list[dict]:
    """Every part of the benchmark; rows go to <results>/perf.csv (replacing this machine's earlier ones
    of the same model) and a figure to <results>/perf.png (`figure_name`: another model's has its own)."""
    from bench.store import append_rows, provenance

    dev = resolve_device(device)
    prepare_dataset(dataset)  # a latent dataset's stand-in, for its geometry
    names = sorted({name for _, name, _ in SAMPLING_CASES} | set(TRAINING_METHODS))
    models = _models(backbone, dataset, kwargs or {}, dev, init, names)
    rows = sampling_rows(models, batch_sizes, steps, repeats, dev, precision, echo)
    if train_batch:
        rows += training_rows(models, train_batch, repeats, dev, echo)
    if inception_images:
        rows += inception_rows(inception_images, min(inception_images, 50), repeats, dev, echo)
    common = {"experiment": "perf", "machine": machine(), "device": str(dev), "backbone": backbone,
              "kwargs": str(kwargs or {}), "weights": init or "random", **provenance()}
    rows = [{**common, **row} for row in rows]
    out = Path(results)
    append_rows(out / "perf.csv", rows, force=True,
                key=("machine", "backbone", "kwargs", "weights", "kind", "case", "batch_size", "precision"))
    perf_figure(rows, out / figure_name(backbone, kwargs, init, dataset, precision, str(dev)))
    return rows


def figure_name(backbone: str = "uvit_tiny", kwargs: dict | None = None, init: str | None = None,
                dataset: str = "mnist", precision: str = "fp32", device: str = "cpu") -> str:
    """perf.png for the default measurement (the tiny U-ViT on MNIST's geometry, random weights, fp32, on
    the CPU); perf-<what differs>.png otherwise, so that another measurement does not replace it."""
    parts = [] if backbone == "uvit_tiny" else [backbone]
    parts += [] if dataset == "mnist" else [dataset]
    parts += [f"{key}{value}" for key, value in sorted((kwargs or {}).items())]
    parts += [f"{Path(init).parent.name}_{Path(init).stem}"] if init else []  # runs/<run>/final.pt: the run
    parts += [] if precision == "fp32" else [precision]
    parts += [] if torch.device(device).type == "cpu" else [torch.device(device).type]
    name = "-".join(["perf", *parts])
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + ".png"


def perf_figure(rows: list[dict], path: Path) -> Path:
    """Measured against theoretical speed-up of every sampling case, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bench.atomic import atomic_write

    sampling = [r for r in rows if r["kind"] == "sampling"]
    batches = sorted({r["batch_size"] for r in sampling})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4.5), squeeze=False, sharey=True)
    for ax, batch in zip(axes[0], batches):
        here = [r for r in sampling if r["batch_size"] == batch]
        ys = range(len(here))
        ax.barh([y + 0.2 for y in ys], [r["speedup_from_gmacs"] for r in here], height=0.4, label="theoretical (GMACs)")
        ax.barh([y - 0.2 for y in ys], [r["measured_speedup"] for r in here], height=0.4, label="measured")
        ax.set_yticks(list(ys), [r["case"] for r in here], fontsize=8)
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"batch {batch}")
        ax.set_xlabel("speed-up over full depth")
    axes[0][0].legend(fontsize=8)
    kwargs = "" if str(rows[0]["kwargs"]) in ("", "{}") else f" {rows[0]['kwargs']}"
    fig.suptitle(f"{rows[0]['machine']}, {rows[0]['backbone']}{kwargs}, weights {rows[0]['weights']}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path
