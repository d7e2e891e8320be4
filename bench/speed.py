"""Throughput of a backbone on this machine: training steps and network calls, in images per second.

A benchmark, not a test: it times warm iterations and writes rows through the store.
"""
from __future__ import annotations

import time

import torch

from backbones import build_backbone
from bench.setup import resolve_device


def _timed(fn, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    tick = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - tick) / repeats


def measure_throughput(backbone: str, batch_size: int, img_size: int = 28, channels: int = 1,
                       device: str = "auto", repeats: int = 5, kwargs: dict | None = None) -> dict:
    """Images/s of one AdamW training step and of one no-grad network call at `batch_size`."""
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = build_backbone(backbone, img_size=img_size, channels=channels, **(kwargs or {})).to(dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch_size, channels, img_size, img_size, device=dev)
    t = torch.rand(batch_size, device=dev) * 999
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")

    def train_step():
        with autocast:
            loss = (model(x, t) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def forward():
        with autocast:
            model(x, t)

    model.train()
    train_s = _timed(train_step, 2, repeats, dev)
    model.eval()
    forward_s = _timed(forward, 2, repeats, dev)
    return {"backbone": backbone, "kwargs": str(kwargs or {}), "params": sum(p.numel() for p in model.parameters()),
            "img_size": img_size, "batch_size": batch_size, "device": str(dev), "threads": torch.get_num_threads(),
            "train_images_per_s": round(batch_size / train_s, 2),
            "forward_images_per_s": round(batch_size / forward_s, 2)}
