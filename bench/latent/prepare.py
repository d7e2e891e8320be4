"""``bench prepare``: encode a dataset once into a latent layout (see ``bench.data.latents`` for how it is
read). Layouts, as written here:

imagenet256/                       (U-ViT scripts/extract_imagenet_feature.py)
  meta.json                        written last: what, how, and the sha256 of every file
  latents.npy                      (N, 4, 32, 32) float16: scale * posterior mean; with flip (default,
                                   as U-ViT) item 2i is image i and item 2i+1 its horizontal mirror
  labels.npy                       (N,) int64, 0..K-1 = the class folders in sorted order (wnids)
  classes.json                     the class folder names in label order
  reference/000000.png ...         real 256 x 256 crops (unflipped) for FID, evenly spaced over the
                                   images, ordered round-robin over the classes (prefixes are balanced)
  reference.json                   their labels and source file names

mscoco/                            (U-ViT scripts/extract_mscoco_feature.py, extract_empty_feature.py)
  meta.json
  empty_context.npy                (77, D) float32: the features of "" (the unconditional context)
  train/latents.npy                (N, 4, 32, 32) float16, images in image-id order
  train/contexts.npy               (M, 77, D) float16: every caption's features, image by image
  train/caption_offsets.npy        (N + 1,) int64: image i's captions are rows offsets[i]:offsets[i+1]
  train/images.json                [{id, file_name, captions}]
  val/contexts.npy, val/caption_offsets.npy, val/images.json    the sampling conditions
  reference/000000.png ...         the val images' 256 x 256 crops, the FID reference (U-ViT: val)
  reference.json

An interrupted preparation resumes when run again with the same options (``LayoutWriter``).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.config import ConfigError
from .autoencoder import COCO_SCALE, SD_SCALE, LatentCodec, load_autoencoder
from .images import RESOLUTION, CocoIndex, CroppedImages, imagenet_files, listing_checksum
from bench.data.layout import REFERENCE_DIR, LayoutWriter, write_json

NULL_LABEL = 1000  # U-ViT: labels 0..999, the null label of classifier-free guidance is 1000
TOKENS = 77
DEFAULT_AUTOENCODER = "stabilityai/sd-vae-ft-ema"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-large-patch14"
DTYPES = ("float16", "float32")
COMMIT_SECONDS = 10.0  # record progress (flush + progress.json) at most this often, and at the end


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _bar(total: int, initial: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="img", disable=not progress)


def resolve_scale(scale: float | str | None, codec: LatentCodec, images, default: float, n: int = 64) -> float:
    """None: ``default`` for a trained autoencoder, "auto" for a random-init one. "auto": 1 / std of the
    unscaled latents of the first ``n`` images (how Stable Diffusion's 0.18215 was chosen), 5 digits."""
    if scale is None:
        scale = "auto" if codec.random_init else default
    if scale == "auto":
        k = min(n, len(images))
        x = torch.stack([images[i] for i in range(k)]).permute(0, 3, 1, 2).float() / 127.5 - 1
        old, codec.scale = codec.scale, 1.0
        try:
            std = float(codec.encode(x).std())
        finally:
            codec.scale = old
        scale = float(f"{1.0 / max(std, 1e-8):.5g}")
    codec.scale = float(scale)
    return codec.scale


class _Committer:
    """Calls writer.commit(key, n) when COMMIT_SECONDS have passed since the last one, or at the end."""

    def __init__(self, writer: LayoutWriter, key: str, total: int):
        self.writer, self.key, self.total, self.last = writer, key, total, time.monotonic()

    def __call__(self, n: int) -> None:
        if n >= self.total or time.monotonic() - self.last >= COMMIT_SECONDS:
            self.writer.commit(self.key, n)
            self.last = time.monotonic()


def encode_images(writer: LayoutWriter, key: str, images, codec: LatentCodec, latents: np.ndarray, *,
                  flip: bool = False, reference: dict[int, int] | None = None, batch_size: int = 64,
                  num_workers: int = 0, progress: bool = True, seed: int = 0) -> None:
    """Encode ``images`` (uint8 H x W x 3 items) into ``latents`` (item i -> row i, or rows 2i, 2i+1 with
    ``flip``), write reference PNGs (image index -> reference number), commit every COMMIT_SECONDS."""
    from PIL import Image

    n, start = len(images), writer.count(key)
    if start >= n:
        return
    reference = reference or {}
    ref_dir = writer.path(REFERENCE_DIR + "/x").parent
    subset = torch.utils.data.Subset(images, range(start, n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=num_workers)
    pos, commit = start, _Committer(writer, key, n)
    with _bar(n, start, f"encode {key}", progress) as bar:
        for u8 in loader:
            b = len(u8)
            x = u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            gen = torch.Generator().manual_seed(seed * 1_000_003 + pos)
            z = codec.encode(x, generator=gen)
            if flip:
                z = torch.stack((z, codec.encode(x.flip(-1), generator=gen)), dim=1).flatten(0, 1)
                latents[2 * pos:2 * (pos + b)] = z.numpy()
            else:
                latents[pos:pos + b] = z.numpy()
            for j in range(b):
                if (pos + j) in reference:
                    Image.fromarray(u8[j].numpy()).save(ref_dir / f"{reference[pos + j]:06d}.png",
                                                        compress_level=4)
            pos += b
            commit(pos)
            bar.update(b)


def encode_captions(writer: LayoutWriter, key: str, captions: list[str], encoder, contexts: np.ndarray, *,
                    batch_size: int = 256, progress: bool = True) -> None:
    """Encode ``captions`` into rows of ``contexts`` (N, 77, D), committing every COMMIT_SECONDS."""
    n, start = len(captions), writer.count(key)
    commit = _Committer(writer, key, n)
    with _bar(n, start, f"encode {key}", progress) as bar:
        for pos in range(start, n, batch_size):
            chunk = captions[pos:pos + batch_size]
            contexts[pos:pos + len(chunk)] = encoder.encode(chunk).numpy()
            commit(pos + len(chunk))
            bar.update(len(chunk))


def evenly_spaced(n: int, k: int | None) -> list[int]:
    """k indices spread evenly over range(n) (all of them if k is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


def interleave_classes(indices: list[int], labels: list[int]) -> list[int]:
    """``indices`` reordered round-robin over their classes (first of each class, then second, ...), so
    that any prefix of the reference (``eval.reference_limit``) is close to class-balanced."""
    seen: dict[int, int] = {}
    rank = []
    for i in indices:
        rank.append(seen.get(labels[i], 0))
        seen[labels[i]] = rank[-1] + 1
    order = sorted(range(len(indices)), key=lambda j: (rank[j], labels[indices[j]], indices[j]))
    return [indices[j] for j in order]


def _common_meta(dataset: str, codec: LatentCodec, count: int, dtype: str) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version as package_version

    try:
        version = package_version("eebench")
    except PackageNotFoundError:
        version = "unknown"
    return {"dataset": dataset, "image_resolution": RESOLUTION,
            "latent_shape": [4, RESOLUTION // 8, RESOLUTION // 8], "scale": codec.scale, "count": count,
            "latents_dtype": dtype, "autoencoder": codec.describe(), "random_init": codec.random_init,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "bench_version": version}


def _check(dtype: str, reference_count: int | None) -> None:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if reference_count is not None and reference_count < 0:
        raise ConfigError(f"reference_count must be >= 0, not {reference_count}")


# ---------------------------------------------------------------------------------------------------
# ImageNet 256
# ---------------------------------------------------------------------------------------------------


def write_class_layout(out, images, labels: list[int], classes: list[str], names: list[str], *,
                       dataset: str, codec: LatentCodec, options: dict, extra_meta: dict, flip: bool,
                       reference_count: int | None, dtype: str, batch_size: int, num_workers: int,
                       overwrite: bool, progress: bool, seed: int = 0) -> Path:
    """Encode a labelled image set into the class-conditional layout (imagenet256 and its stand-in)."""
    n = len(images)
    ref = interleave_classes(evenly_spaced(n, reference_count), labels)
    with LayoutWriter(out, {**options, "scale": codec.scale}, overwrite) as w:
        if w.done:
            return w.out
        latents = w.array("latents.npy", (n * (2 if flip else 1), 4, RESOLUTION // 8, RESOLUTION // 8), dtype)
        encode_images(w, "images", images, codec, latents, flip=flip, reference={i: r for r, i in enumerate(ref)},
                      batch_size=batch_size, num_workers=num_workers, progress=progress, seed=seed)
        lab = np.asarray(labels, np.int64)
        np.save(w.path("labels.npy"), np.repeat(lab, 2) if flip else lab)
        write_json(w.path("classes.json"), list(classes))
        write_json(w.path("reference.json"), {"split": "train", "count": len(ref), "labels": [labels[i] for i in ref],
                                              "names": [names[i] for i in ref], "source_index": ref})
        meta = {**_common_meta(dataset, codec, len(latents), dtype), "kind": "class", "flip": flip,
                "source_images": n, "num_classes": len(classes), "null_label": NULL_LABEL,
                "reference": {"dir": REFERENCE_DIR, "split": "train", "count": len(ref),
                              "selection": "evenly spaced over the source images, unflipped; "
                                           "ordered round-robin over the classes"},
                **extra_meta}
        return w.finish(meta)


def prepare_imagenet256(source: str | os.PathLike, out: str | os.PathLike, *,
                        autoencoder: str = DEFAULT_AUTOENCODER, scale: float | str | None = None,
                        flip: bool = True, per_class: int | None = None, limit: int | None = None,
                        reference_count: int | None = 50_000, dtype: str = "float16", posterior: str = "mean",
                        batch_size: int = 64, num_workers: int = 4, device: str = "auto",
                        overwrite: bool = False, progress: bool = True) -> Path:
    """Encode ImageNet training images into an ``imagenet256`` layout at ``out`` and return its path.

    ``source``: ILSVRC2012 ``train/`` (``<wnid>/*.JPEG``; sorted wnids are labels 0..999), a folder
    holding ``train/``, or any ``<class>/<image>`` folder or zip. Each image is centre-cropped to
    256 x 256 as U-ViT does and encoded by ``autoencoder`` (``bench.latent.load_autoencoder`` spec);
    ``scale``: None = 0.18215 (U-ViT) for a trained autoencoder, "auto" for a random one.
    ``flip``: also store each image's mirror (U-ViT's extract script does; doubles N).
    ``per_class`` / ``limit``: only the first images of each class / the first images in all.
    ``reference_count``: real crops kept for FID (evenly spaced; None: all). Resumable; atomic.
    """
    _check(dtype, reference_count)
    files, labels, classes = imagenet_files(source)
    keep = _subset(labels, per_class, limit)
    files, labels = [files[i] for i in keep], [labels[i] for i in keep]
    codec = load_autoencoder(autoencoder, posterior=posterior, device=resolve_device(device))
    images = CroppedImages(files, "imagenet")
    resolve_scale(scale, codec, images, SD_SCALE)
    src = {"path": str(Path(source).expanduser().absolute()), "listing_sha256": listing_checksum(files),
           "images": len(files), "crop": "U-ViT center_crop_arr (BOX halvings, BICUBIC, centre 256)"}
    options = {"dataset": "imagenet256", "source": src, "autoencoder": autoencoder,
               "fingerprint": codec.fingerprint, "flip": flip, "per_class": per_class, "limit": limit,
               "reference_count": reference_count, "dtype": dtype, "posterior": posterior}
    return write_class_layout(out, images, labels, classes, [m for _, m in files], dataset="imagenet256",
                              codec=codec, options=options, extra_meta={"source": src}, flip=flip,
                              reference_count=reference_count, dtype=dtype, batch_size=batch_size,
                              num_workers=num_workers, overwrite=overwrite, progress=progress)


def _subset(labels: list[int], per_class: int | None, limit: int | None) -> list[int]:
    keep, taken = [], {}
    for i, y in enumerate(labels):
        if per_class is None or taken.get(y, 0) < per_class:
            taken[y] = taken.get(y, 0) + 1
            keep.append(i)
    return keep[:limit] if limit is not None else keep


# ---------------------------------------------------------------------------------------------------
# MS-COCO 2014
# ---------------------------------------------------------------------------------------------------


def _caption_rows(records: list[dict]) -> tuple[list[str], np.ndarray]:
    captions = [c for r in records for c in r["captions"]]
    offsets = np.cumsum([0] + [len(r["captions"]) for r in records]).astype(np.int64)
    return captions, offsets


def write_text_layout(out, train_images, train_records: list[dict], val_images, val_records: list[dict], *,
                      dataset: str, codec: LatentCodec, encoder, options: dict, extra_meta: dict, dtype: str,
                      batch_size: int, num_workers: int, overwrite: bool, progress: bool) -> Path:
    """Encode captioned train images and val captions + val reference crops into the text layout."""
    n, v = len(train_images), len(val_images)
    d = encoder.dim
    with LayoutWriter(out, {**options, "scale": codec.scale}, overwrite) as w:
        if w.done:
            return w.out
        latents = w.array("train/latents.npy", (n, 4, RESOLUTION // 8, RESOLUTION // 8), dtype)
        encode_images(w, "train", train_images, codec, latents, batch_size=batch_size,
                      num_workers=num_workers, progress=progress)
        for split, records in (("train", train_records), ("val", val_records)):
            captions, offsets = _caption_rows(records)
            contexts = w.array(f"{split}/contexts.npy", (len(captions), TOKENS, d), dtype)
            encode_captions(w, f"{split}_captions", captions, encoder, contexts, progress=progress)
            np.save(w.path(f"{split}/caption_offsets.npy"), offsets)
            write_json(w.path(f"{split}/images.json"), records)
        # the reference: every val image's crop (no latents are kept for val)
        _write_reference(w, val_images, batch_size, num_workers, progress)
        np.save(w.path("empty_context.npy"), encoder.encode([""])[0].numpy().astype(np.float32))
        write_json(w.path("reference.json"), {"split": "val", "count": v, "labels": None,
                                              "names": [r["file_name"] for r in val_records],
                                              "source_index": list(range(v))})
        meta = {**_common_meta(dataset, codec, n, dtype), "kind": "text", "context_shape": [TOKENS, d],
                "text_encoder": encoder.describe(), "random_init": codec.random_init or encoder.random_init,
                "train": {"images": n, "captions": int(sum(len(r["captions"]) for r in train_records))},
                "val": {"images": v, "captions": int(sum(len(r["captions"]) for r in val_records))},
                "caption_choice": "training item i uses caption hash(i, epoch) mod its captions (U-ViT: random)",
                "reference": {"dir": REFERENCE_DIR, "split": "val", "count": v, "selection": "all val images kept"},
                **extra_meta}
        return w.finish(meta)


def _write_reference(w: LayoutWriter, images, batch_size: int, num_workers: int, progress: bool) -> None:
    from PIL import Image

    n, start = len(images), w.count("reference")
    ref_dir = w.path(REFERENCE_DIR + "/x").parent
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(images, range(start, n)),
                                         batch_size=batch_size, num_workers=num_workers)
    pos, commit = start, _Committer(w, "reference", n)
    with _bar(n, start, "reference images", progress) as bar:
        for u8 in loader:
            for j in range(len(u8)):
                Image.fromarray(u8[j].numpy()).save(ref_dir / f"{pos + j:06d}.png", compress_level=4)
            pos += len(u8)
            commit(pos)
            bar.update(len(u8))


def prepare_mscoco(source: str | os.PathLike, out: str | os.PathLike, *,
                   autoencoder: str = DEFAULT_AUTOENCODER, text_encoder: str = DEFAULT_TEXT_ENCODER,
                   scale: float | str | None = None, max_captions: int | None = None,
                   limit: int | None = None, val_limit: int | None = None, dtype: str = "float16",
                   posterior: str = "mean", batch_size: int = 64, num_workers: int = 4, device: str = "auto",
                   overwrite: bool = False, progress: bool = True) -> Path:
    """Encode MS-COCO 2014 into an ``mscoco`` layout at ``out`` and return its path.

    ``source``: a folder with ``train2014/``, ``val2014/`` and ``annotations/captions_{train,val}2014.json``
    (or the official zips train2014.zip, val2014.zip, annotations_trainval2014.zip, in any nesting).
    Train images (centre square, LANCZOS to 256, as U-ViT) are encoded by ``autoencoder``
    (``scale``: None = 0.23010, U-ViT's mscoco config, for a trained autoencoder; "auto" for a random
    one); every caption (``max_captions`` per image; None: all) by ``text_encoder`` (77 tokens, last
    hidden state); val captions become the sampling conditions and val crops the FID reference.
    ``limit`` / ``val_limit``: the first images by id. Resumable; atomic.
    """
    _check(dtype, None)
    index = CocoIndex(source)
    train, val = index.split("train", max_captions)[:limit], index.split("val", max_captions)[:val_limit]
    dev = resolve_device(device)
    codec = load_autoencoder(autoencoder, posterior=posterior, device=dev)
    from .text import load_text_encoder

    encoder = load_text_encoder(text_encoder, device=dev)
    train_images, val_images = CroppedImages(index.files(train), "coco"), CroppedImages(index.files(val), "coco")
    resolve_scale(scale, codec, train_images, COCO_SCALE)
    files = index.files(train) + index.files(val)
    src = {"path": str(Path(source).expanduser().absolute()), "listing_sha256": listing_checksum(files),
           "train_images": len(train), "val_images": len(val),
           "crop": "U-ViT center_crop (central square, LANCZOS to 256)"}
    options = {"dataset": "mscoco", "source": src, "autoencoder": autoencoder, "fingerprint": codec.fingerprint,
               "text_encoder": text_encoder, "text_fingerprint": encoder.fingerprint, "max_captions": max_captions,
               "limit": limit, "val_limit": val_limit, "dtype": dtype, "posterior": posterior}
    return write_text_layout(out, train_images, train, val_images, val, dataset="mscoco", codec=codec,
                             encoder=encoder, options=options, extra_meta={"source": src}, dtype=dtype,
                             batch_size=batch_size, num_workers=num_workers, overwrite=overwrite, progress=progress)
