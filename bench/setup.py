"""Build the pieces a resolved config describes: device, dataset, schedule, model."""
from __future__ import annotations

import torch

from backbones import build_backbone
from bench.config import ConfigError
from bench.errors import DeviceError
from methods.base import DiffusionModel, Method


def resolve_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N (| mps ...): a device that exists here, else a DeviceError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device / run.device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} was asked for but torch sees no GPU; use --device cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r} is not available here; use auto, cpu or cuda")
    return device


def prepare_dataset(name: str, path=None) -> None:
    """Make what a dataset needs before anything reads it: a latent dataset without a path gets its
    stand-in layout, prepared once into the cache (bench.latent.standin). The commands that train,
    sample or sweep call this when they start; everything that only reads (checksums, dataset info,
    `bench config`) never prepares anything and fails with a clear error instead."""
    from bench.data import DATASETS

    if DATASETS.get(name).info.latent and path is None:
        from bench.latent.standin import ensure_standin

        ensure_standin(name)


def prepare_data(cfg: dict) -> None:
    """prepare_dataset for the run's dataset."""
    prepare_dataset(cfg["data"]["name"], cfg["data"]["path"])


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
    try:
        backbone = build_backbone(cfg["model"]["backbone"], img_size=resolution, channels=channels, **kwargs)
    except (TypeError, ValueError) as err:
        user = cfg["model"]["kwargs"]
        if not user:
            raise
        try:  # blame model.kwargs only if the backbone builds without them
            build_backbone(cfg["model"]["backbone"], img_size=resolution, channels=channels,
                           **{k: v for k, v in kwargs.items() if k not in user})
        except Exception:
            raise err from None
        raise ConfigError(f"model.kwargs {user}: {cfg['model']['backbone']} cannot be built with them ({err})") from None
    return DiffusionModel(backbone, method.attach(backbone))
