"""Sampling from a trained model: batched, seeded per sample, timed, with an image grid."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import Tensor

from bench.atomic import atomic_write
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel, ExitRecord


@torch.no_grad()
def generate(model, schedule, sample_cfg: dict, seed: int, shape: tuple[int, ...], device: torch.device,
             progress: bool = True, method=None, callback=None, conditioning=None,
             decode=None) -> tuple[Tensor, dict]:
    """n_samples images in [-1, 1] (on the CPU) and measurements of how they were made.

    Sample i's noise (and condition) depends only on (seed, i), so the images do not depend on the
    batch size. The network runs through the early-exit engine with `sample_cfg["threshold"]`
    (None: full depth) and, for a conditional model (`conditioning`), classifier-free guidance at
    `sample_cfg["guidance_scale"]`. `decode` turns the sampler's output into images (latent models:
    the autoencoder's decoder; not timed). `callback(step, x, t)` sees the first batch's trajectory.
    """
    model.eval()
    sampler = SAMPLERS.get(sample_cfg["sampler"])
    n, batch = sample_cfg["n_samples"], sample_cfg["batch_size"]
    engine = EarlyExitModel(model, method, threshold=sample_cfg["threshold"], mode=sample_cfg["engine_mode"],
                            uncond=None if conditioning is None else conditioning.null.to(device),
                            guidance_scale=sample_cfg.get("guidance_scale"),
                            guidance_exit=sample_cfg.get("guidance_exit", "both"))
    images, seconds = [], 0.0
    for start in range(0, n, batch):
        indices = torch.arange(start, min(n, start + batch))
        noise = NoiseSource(seed, indices)
        engine.cond = None if conditioning is None else conditioning.sampling(indices, seed, device)
        _sync(device)
        tick = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=sample_cfg.get("precision") == "bf16"):
            x = sampler(engine, schedule, noise, shape, sample_cfg["steps"], device=device,
                        progress=progress and start == 0, callback=callback if start == 0 else None,
                        **sample_cfg["options"])
        _sync(device)
        seconds += time.perf_counter() - tick
        if progress and start == 0 and n > batch:  # the one bar shows the first batch: say what the rest costs
            batches = -(-n // batch)
            print(f"sampling {n} images in {batches} batches: about {seconds * batches / 60:.1f} min "
                  f"({seconds:.1f} s for the first)", flush=True)
        if decode is not None:
            x = decode(x)
        images.append(x.clamp(-1, 1).float().cpu())
    record = engine.record
    calls = sum(len(e) for e in record.exit_blocks)
    stats = {"seconds_per_image": seconds / n, "layer_ratio": record.layer_ratio(model.backbone.num_exits),
             "network_calls_per_image": calls / n, "passes_per_call": 2 if engine.guided else 1, "record": record}
    return torch.cat(images), stats


def gflops_per_call(flops: dict[str, float], record: ExitRecord, decide_gmacs: list[float] | None = None) -> float:
    """Mean fvcore cost of one network call from what ran: prepare + blocks up to the exit + that exit's head,
    plus, where the method asked after block j (threshold set), its cost of deciding there (UEMs, exit predictors).
    """
    blocks = [flops[k] for k in sorted((k for k in flops if k.startswith("block_")), key=lambda k: int(k[6:]))]
    cumulative = torch.tensor(blocks, dtype=torch.float64).cumsum(0)
    last = len(blocks) - 1
    exits = torch.cat(record.exit_blocks)
    heads = torch.tensor([flops.get(f"head_{i}", flops[f"head_{last}"]) for i in range(len(blocks))],
                         dtype=torch.float64)
    cost = flops["prepare"] + cumulative[exits] + heads[exits]
    if decide_gmacs is not None:
        deciding = torch.tensor(decide_gmacs, dtype=torch.float64).cumsum(0)
        cost = cost + deciding[exits.clamp(max=len(decide_gmacs) - 1)]
    return float(cost.mean())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_grid(images: Tensor, path: Path, nrow: int | None = None) -> Path:
    """A PNG grid of images in [-1, 1], written atomically."""
    from torchvision.utils import save_image

    nrow = nrow or max(1, int(len(images) ** 0.5))
    return atomic_write(path, lambda f: save_image((images + 1) / 2, f, format="png", nrow=nrow, padding=2,
                                                   pad_value=1.0))
