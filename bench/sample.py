"""Sampling from a trained model: batched, seeded per sample, timed, with an image grid."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from bench.diffusion import SAMPLERS, NoiseSource


class BlockCounter:
    """Noise prediction through the exit contract that counts the blocks that really ran."""

    def __init__(self, model, cond: Tensor | None = None):
        self.backbone = model.backbone
        self.cond = cond
        self.blocks_run = 0      # summed over samples and network calls
        self.sample_calls = 0    # network calls times samples

    def __call__(self, x: Tensor, model_t: Tensor) -> Tensor:
        bb = self.backbone
        state = bb.prepare(x, model_t, self.cond)
        for i in range(bb.num_exits):
            state = bb.run_block(i, state)
        self.blocks_run += bb.num_exits * x.shape[0]
        self.sample_calls += x.shape[0]
        return bb.head(state, bb.num_exits - 1)

    @property
    def layer_ratio(self) -> float:
        return self.blocks_run / max(1, self.sample_calls * self.backbone.num_exits)


@torch.no_grad()
def generate(model, schedule, sample_cfg: dict, seed: int, shape: tuple[int, ...], device: torch.device,
             progress: bool = True) -> tuple[Tensor, dict]:
    """n_samples images in [-1, 1] (on the CPU) and measurements of how they were made.

    Sample i's noise depends only on (seed, i), so the images do not depend on the batch size.
    """
    model.eval()
    sampler = SAMPLERS.get(sample_cfg["sampler"])
    n, batch = sample_cfg["n_samples"], sample_cfg["batch_size"]
    counter = BlockCounter(model)
    images, seconds = [], 0.0
    for start in range(0, n, batch):
        indices = torch.arange(start, min(n, start + batch))
        noise = NoiseSource(seed, indices)
        _sync(device)
        tick = time.perf_counter()
        x = sampler(counter, schedule, noise, shape, sample_cfg["steps"], device=device,
                    progress=progress and start == 0, **sample_cfg["options"])
        _sync(device)
        seconds += time.perf_counter() - tick
        images.append(x.clamp(-1, 1).float().cpu())
    stats = {"seconds_per_image": seconds / n, "layer_ratio": counter.layer_ratio,
             "network_calls_per_image": counter.sample_calls / n}
    return torch.cat(images), stats


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def save_grid(images: Tensor, path: Path, nrow: int | None = None) -> Path:
    """A PNG grid of images in [-1, 1], written atomically."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or max(1, int(len(images) ** 0.5))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        save_image((images + 1) / 2, tmp, nrow=nrow, padding=2, pad_value=1.0)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
