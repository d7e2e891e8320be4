"""Reading the source images of the latent datasets: U-ViT's two centre crops, ImageNet class folders,
MS-COCO image folders (or their zips) with the caption annotations.

Crops (github baofff/U-ViT, datasets.py):
- ImageNet (``center_crop_arr``, from guided-diffusion): halve with a BOX filter while the short side
  is at least twice 256, resize the short side to 256 with BICUBIC (sizes rounded), then take the
  central 256 x 256.
- MS-COCO (``center_crop``): take the central square of the short side, then resize it to 256 x 256
  with LANCZOS.
"""
from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError

RESOLUTION = 256


def center_crop_arr(img: Image.Image, size: int = RESOLUTION) -> np.ndarray:
    """uint8 size x size x 3, the ImageNet crop (BOX halvings, BICUBIC resize of the short side, centre)."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.array(arr[top:top + size, left:left + size])  # a writable copy


def center_crop_lanczos(img: Image.Image, size: int = RESOLUTION) -> np.ndarray:
    """uint8 size x size x 3, the MS-COCO crop (central square of the short side, LANCZOS resize)."""
    arr = np.asarray(img)
    side = min(arr.shape[:2])
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    square = Image.fromarray(np.ascontiguousarray(arr[top:top + side, left:left + side]))
    return np.array(square.resize((size, size), Image.LANCZOS))


CROPS: dict[str, Callable[[Image.Image, int], np.ndarray]] = {
    "imagenet": center_crop_arr, "coco": center_crop_lanczos,
}


class CroppedImages(torch.utils.data.Dataset):
    """uint8 tensors H x W x 3 of files read from (source, member) pairs and cropped; picklable."""

    def __init__(self, files: Sequence[tuple[object, str]], crop: str, size: int = RESOLUTION):
        self.files, self.crop, self.size = list(files), crop, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        from bench.data.core import decode

        source, member = self.files[index]
        img = decode(source.read(member), "RGB")
        return torch.from_numpy(CROPS[self.crop](img, self.size))


class ArrayImages(torch.utils.data.Dataset):
    """uint8 tensors H x W x 3 from an in-memory uint8 array N x H x W x 3 (the stand-in digits)."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[index]))


# ---------------------------------------------------------------------------------------------------
# ImageNet (or any class-folder tree)
# ---------------------------------------------------------------------------------------------------


def imagenet_files(source: str | os.PathLike) -> tuple[list[tuple[object, str]], list[int], list[str]]:
    """(files, labels, classes) of a ``<class>/<image>`` folder or zip (ILSVRC2012 ``train/<wnid>/``,
    or a root holding ``train/``): classes in sorted order are labels 0..K-1 (sorted wnids = U-ViT's
    ImageNet labels), images by class, then file name. Read through bench.data's imagefolder."""
    from bench.data import build_dataset

    ds = build_dataset("imagefolder", source, split="train")
    if not ds.classes:
        raise DataError(f"{source}: expected one folder per class (<class>/<image>), as ILSVRC2012 "
                         "train/<wnid>/*.JPEG; found images at other depths")
    return [(ds.source, n) for n in ds.names], list(ds.labels), list(ds.classes)


def listing_checksum(files: Sequence[tuple[object, str]]) -> str:
    """sha256 over the sources' relative names and sizes: identifies the set of source files without
    reading 140 GB of ImageNet (not a content hash)."""
    import hashlib

    h = hashlib.sha256()
    sizes: dict[int, dict[str, int]] = {}
    for source, member in files:
        if getattr(source, "kind", "") == "zip":
            table = sizes.setdefault(id(source), {i.filename: i.file_size for i in source.archive().infolist()})
            size = table[member]
        else:
            size = (Path(source.path) / member).stat().st_size
        h.update(f"{member}\0{size}\n".encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# MS-COCO 2014: images and captions from folders or the official zips, in any nesting
# ---------------------------------------------------------------------------------------------------

COCO_SPLITS = {"train": ("train2014", "captions_train2014.json"), "val": ("val2014", "captions_val2014.json")}


class CocoIndex:
    """Where every COCO image file and caption file lies below ``root``: a folder (extracted or holding
    train2014.zip, val2014.zip, annotations_trainval2014.zip) or one zip."""

    def __init__(self, root: str | os.PathLike):
        from bench.data.sources import ZipSource, is_image, open_source

        self.root = Path(os.path.expanduser(os.fspath(root)))
        self.images: dict[str, tuple[object, str]] = {}
        self.jsons: dict[str, tuple[object, str]] = {}
        top = open_source(self.root)
        sources = [top]
        if top.kind == "folder":
            sources += [ZipSource(self.root / f) for f in top.files()
                        if f.lower().endswith(".zip") and zipfile.is_zipfile(self.root / f)]
        for src in sources:
            for member in src.files():
                name = PurePosixPath(member).name
                if name.startswith("captions_") and name.endswith(".json"):
                    self.jsons.setdefault(name, (src, member))
                elif is_image(name) and not name.lower().endswith(".zip"):
                    self.images.setdefault(name, (src, member))

    def split(self, split: str, max_captions: int | None = None) -> list[dict]:
        """[{id, file_name, captions}] of a split, sorted by image id (U-ViT's order); captions in the
        annotation file's order, at most ``max_captions`` of them (None: all; COCO has 5 to 7)."""
        folder, ann = COCO_SPLITS[split]
        if ann not in self.jsons:
            raise FileNotFoundError(f"{self.root}: no {ann} (from annotations_trainval2014.zip) found")
        src, member = self.jsons[ann]
        data = json.loads(src.read(member))
        captions: dict[int, list[str]] = {}
        for a in data["annotations"]:
            captions.setdefault(int(a["image_id"]), []).append(str(a["caption"]).strip())
        out, missing = [], []
        for img in sorted(data["images"], key=lambda i: int(i["id"])):
            name = img["file_name"]
            if name not in self.images:
                missing.append(name)
                continue
            caps = captions.get(int(img["id"]), [])
            if caps:
                out.append({"id": int(img["id"]), "file_name": name,
                            "captions": caps[:max_captions] if max_captions else caps})
        if missing:
            raise FileNotFoundError(f"{self.root}: {len(missing)} {folder} images named in {ann} are "
                                    f"missing, e.g. {missing[:3]}")
        if not out:
            raise DataError(f"{self.root}: no captioned {folder} images")
        return out

    def files(self, records: list[dict]) -> list[tuple[object, str]]:
        return [self.images[r["file_name"]] for r in records]
