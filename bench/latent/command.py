"""``bench prepare``: the plain functions behind the command (the CLI only parses options).

    bench prepare imagenet256 --source /data/ILSVRC2012/train --out data/imagenet256 \\
        --autoencoder stabilityai/sd-vae-ft-ema
    bench prepare mscoco --source /data/coco --out data/mscoco \\
        --autoencoder stabilityai/sd-vae-ft-ema --text-encoder openai/clip-vit-large-patch14
    bench prepare imagenet256 --standin --out data/imagenet256-standin      # embedded MNIST, random encoders
"""
from __future__ import annotations

import os
from pathlib import Path

from bench.config import ConfigError

DATASETS = ("imagenet256", "mscoco")


def prepare(dataset: str, source: str | os.PathLike | None, out: str | os.PathLike, **options) -> Path:
    """Dispatch to ``prepare_imagenet256`` / ``prepare_mscoco`` (bench.latent.prepare) with ``options``
    as they take them; ``source=None``: ``prepare_standin`` (bench.latent.standin)."""
    if dataset not in DATASETS:
        raise ConfigError(f"bench prepare: unknown latent dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if source is None:
        from .standin import prepare_standin

        return prepare_standin(dataset, out, **options)
    from .prepare import prepare_imagenet256, prepare_mscoco

    return (prepare_imagenet256 if dataset == "imagenet256" else prepare_mscoco)(source, out, **options)


def parse_scale(scale: str | float | None) -> float | str | None:
    """``--scale``: a number, "auto" (1 / std of the latents) or None (the dataset's U-ViT value for a
    trained autoencoder, auto for a random one)."""
    if scale is None or scale == "auto":
        return scale
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise ConfigError(f"--scale must be a number or 'auto', not {scale!r}") from None
    if not value > 0:
        raise ConfigError(f"--scale must be positive, not {value}")
    return value


def prepare_command(dataset: str, out: str | os.PathLike, source: str | os.PathLike | None = None, *,
                    standin: bool = False, autoencoder: str | None = None, text_encoder: str | None = None,
                    scale: str | float | None = None, flip: bool = True, per_class: int | None = None,
                    limit: int | None = None, val_limit: int | None = None, max_captions: int | None = None,
                    reference_count: int | None = None, n: int | None = None, dtype: str = "float16",
                    batch_size: int = 64, num_workers: int = 4, device: str = "auto", overwrite: bool = False,
                    progress: bool = True) -> Path:
    """``bench prepare DATASET --out OUT (--source SRC | --standin) [options]``; returns the layout folder.

    Options that do not apply to ``dataset`` must be left unset (a ValueError says which). Defaults:
    ``autoencoder`` stabilityai/sd-vae-ft-ema (stand-in: random:tiny), ``text_encoder``
    openai/clip-vit-large-patch14 (mscoco; stand-in: random:tiny), ``reference_count`` 50,000 for
    imagenet256 (-1: every image), ``n`` 300 stand-in digits.
    """
    if dataset not in DATASETS:
        raise ConfigError(f"bench prepare: unknown latent dataset {dataset!r}; valid: {', '.join(DATASETS)}")
    if standin == (source is not None):
        raise ConfigError("bench prepare: give --source (the official files) or --standin (embedded MNIST), "
                         "not both and not neither")
    given = {"per_class": per_class, "limit": limit, "val_limit": val_limit, "max_captions": max_captions,
             "reference_count": reference_count, "n": n}
    allowed = {("imagenet256", False): {"per_class", "limit", "reference_count"},
               ("mscoco", False): {"limit", "val_limit", "max_captions"},
               ("imagenet256", True): {"n"}, ("mscoco", True): {"n", "val_limit"}}[(dataset, standin)]
    misplaced = [k for k, v in given.items() if v is not None and k not in allowed]
    if text_encoder is not None and dataset != "mscoco":
        misplaced.append("text_encoder")
    if not flip and (standin or dataset != "imagenet256"):
        misplaced.append("no_flip")
    if misplaced:
        raise ConfigError(f"bench prepare {dataset}{' --standin' if standin else ''}: "
                         f"{', '.join('--' + w.replace('_', '-') for w in misplaced)} do not apply")
    common = dict(scale=parse_scale(scale), dtype=dtype, batch_size=batch_size, device=device,
                  overwrite=overwrite, progress=progress)
    if standin:
        from .standin import STANDIN_DEFAULTS

        opts = dict(n=n or STANDIN_DEFAULTS["n"], autoencoder=autoencoder or "random:tiny", **common)
        if dataset == "mscoco":
            opts.update(text_encoder=text_encoder or "random:tiny", val_n=val_limit or STANDIN_DEFAULTS["val_n"])
        return prepare(dataset, None, out, **opts)
    from .prepare import DEFAULT_AUTOENCODER, DEFAULT_TEXT_ENCODER

    opts = dict(autoencoder=autoencoder or DEFAULT_AUTOENCODER, num_workers=num_workers, limit=limit, **common)
    if dataset == "imagenet256":
        count = 50_000 if reference_count is None else (None if reference_count < 0 else reference_count)
        opts.update(flip=flip, per_class=per_class, reference_count=count)
    else:
        opts.update(text_encoder=text_encoder or DEFAULT_TEXT_ENCODER, val_limit=val_limit, max_captions=max_captions)
    return prepare(dataset, source, out, **opts)
