"""Behaviour along the sampling trajectory: where samples exit, how errors accumulate, layer errors.

- `per_call_rows`: for every network call, the layer ratio and the histogram of exit blocks
  (paper Fig. 6 sums these; a per-step curve shows the time dependence).
- `trajectory_rows`: MSE between an early-exit trajectory and the full model's from the same
  initial noise, after every sampler step (paper Fig. 7).
- `LayerErrorProbe`: a full-depth eps_fn that also reads every exit's head and records its MSE
  against the final prediction, per network call (paper Fig. 1).
"""
from __future__ import annotations

import torch
from torch import Tensor

from bench.engine import ExitRecord


def per_call_rows(record: ExitRecord, num_exits: int, run_id: str) -> list[dict]:
    """One row per network call: its network time, layer ratio and how many samples exited at each block."""
    rows = []
    for call, (exits, model_time) in enumerate(zip(record.exit_blocks, record.model_times)):
        counts = torch.bincount(exits, minlength=num_exits).tolist()
        rows.append({"run_id": run_id, "call": call, "model_time": round(model_time, 4),
                     "layer_ratio": round(float((exits.double() + 1).mean() / num_exits), 6),
                     **{f"exits_block_{i}": c for i, c in enumerate(counts)}})
    return rows


def trajectory_rows(early: list[Tensor], full: list[Tensor], times: list[float], run_id: str) -> list[dict]:
    """Per sampler step: mean squared difference between the early-exit and full-depth states."""
    if len(early) != len(full):
        raise ValueError(f"trajectories differ in length ({len(early)} vs {len(full)} steps)")
    return [{"run_id": run_id, "step": k, "t": round(t, 6), "mse_vs_full": float(((e - f) ** 2).mean())}
            for k, (e, f, t) in enumerate(zip(early, full, times))]


class TrajectoryRecorder:
    """A sampler callback that keeps the state after every step (first `keep` samples, on the CPU)."""

    def __init__(self, keep: int = 16):
        self.keep, self.states, self.times = keep, [], []

    def __call__(self, step: int, x: Tensor, t: float) -> None:
        self.states.append(x[: self.keep].detach().float().cpu())
        self.times.append(float(t))


class LayerErrorProbe:
    """Full-depth noise prediction that records, per call, each exit's MSE against the final output.

    It also keeps the network inputs of every call (first `keep` samples) for later snapshots.
    """

    def __init__(self, model, cond: Tensor | None = None, keep: int = 4):
        self.backbone, self.cond, self.keep = model.backbone, cond, keep
        self.rows: list[tuple[float, list[float]]] = []
        self.inputs: list[tuple[Tensor, Tensor]] = []

    @torch.no_grad()
    def __call__(self, x: Tensor, model_t: Tensor) -> Tensor:
        bb = self.backbone
        self.inputs.append((x[: self.keep].clone(), model_t[: self.keep].clone()))
        state, preds = bb.prepare(x, model_t, self.cond), []
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            preds.append(bb.head(state, i))
        final = preds[-1]
        self.rows.append((float(model_t.float().mean()), [float(((p - final) ** 2).mean()) for p in preds]))
        return final

    def as_rows(self, run_id: str) -> list[dict]:
        return [{"run_id": run_id, "call": call, "model_time": round(t, 4),
                 **{f"mse_exit_{i}": round(v, 8) for i, v in enumerate(errors)}}
                for call, (t, errors) in enumerate(self.rows)]


@torch.no_grad()
def timestep_loss_rows(model, schedule, images: Tensor, buckets: int, seed: int, run_id: str,
                       cond: Tensor | None = None) -> list[dict]:
    """Each exit's noise-prediction MSE (L_simple at that exit) per bucket of diffusion time (paper Fig. 3).

    Bucket k holds times drawn uniformly in [k/buckets, (k+1)/buckets) of the schedule's [0, 1].
    `cond`: the images' labels or text features, for a conditional model.
    """
    bb, gen = model.backbone, torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    rows = []
    for k in range(buckets):
        t = (k + torch.rand(len(images), generator=gen, dtype=torch.float64)) / buckets
        noise = torch.randn(images.shape, generator=gen)
        x_t = schedule.add_noise(images, t, noise).to(device)
        state, errors = bb.prepare(x_t, schedule.model_time(t).to(device), cond), []
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
            errors.append(float(((bb.head(state, i).cpu() - noise) ** 2).mean()))
        rows.append({"run_id": run_id, "bucket": k, "t_low": k / buckets, "t_high": (k + 1) / buckets,
                     "n_images": len(images), **{f"mse_exit_{i}": round(e, 8) for i, e in enumerate(errors)}})
    return rows


@torch.no_grad()
def uncertainty_snapshots(method, model, probe_inputs: list[tuple[Tensor, Tensor]], keep: int = 4,
                          cond: Tensor | None = None) -> dict | None:
    """DeeDiff's per-exit uncertainty maps at chosen network calls (paper Fig. 4), as float16 arrays;
    None for a method without maps. `cond`: the samples' conditions (the probe's), for a conditional model."""
    maps, times, inputs = [], [], []
    for x, model_t in probe_inputs:
        per_exit = method.uncertainty_maps(model, x[:keep], model_t[:keep], None if cond is None else cond[:keep])
        if per_exit is None:
            return None
        maps.append(torch.stack(per_exit, 1).half().cpu())  # (keep, exits, C, H, W)
        times.append(float(model_t.float().mean()))
        inputs.append(x[:keep].half().cpu())
    return {"maps": torch.stack(maps).numpy(), "model_times": torch.tensor(times).numpy(),
            "x_t": torch.stack(inputs).numpy()}
