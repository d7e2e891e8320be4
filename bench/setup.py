"""Build the pieces a resolved config describes: device, dataset, schedule, model."""
from __future__ import annotations

import torch

from backbones import build_backbone
from methods.base import DiffusionModel, Method


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but torch sees no GPU; use --device cpu")
    return torch.device(name)


def build_train_dataset(cfg: dict):
    """The training images of the configured dataset (flips happen in the training loop)."""
    from bench.data import build_dataset

    d = cfg["data"]
    extra = {"download": True} if d["download"] else {}
    return build_dataset(d["name"], path=d["path"], split=d["split"], resolution=d["resolution"],
                         flip=False, limit=d["limit"], **extra)


def image_geometry(cfg: dict) -> tuple[int, int, int | None]:
    """(resolution, channels, classes) of the configured dataset, without loading it."""
    from bench.data import dataset_info

    info = dataset_info(cfg["data"]["name"], resolution=cfg["data"]["resolution"], path=cfg["data"]["path"])
    return info.resolution, info.channels, None


def build_schedule(cfg: dict):
    from bench.diffusion import SCHEDULES

    return SCHEDULES.get(cfg["model"]["schedule"])()


def build_model(cfg: dict, method: Method) -> DiffusionModel:
    """The backbone sized for the dataset, plus what the method attaches."""
    from bench.conditioning import build_conditioning

    resolution, channels, classes = image_geometry(cfg)
    conditioning = build_conditioning(cfg)
    kwargs = {**(conditioning.backbone_kwargs() if conditioning else {}),
              **method.backbone_overrides(cfg["model"]["backbone"]), **cfg["model"]["kwargs"]}
    kwargs.setdefault("num_classes", classes)
    backbone = build_backbone(cfg["model"]["backbone"], img_size=resolution, channels=channels, **kwargs)
    return DiffusionModel(backbone, method.attach(backbone))
