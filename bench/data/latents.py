"""The latent datasets ``imagenet256`` and ``mscoco``: autoencoder latents precomputed by ``bench prepare``
(layouts: ``bench.latent.prepare``), plus what sampling and FID need from them.

Items: ``imagenet256`` -> (latent float32 4 x 32 x 32, label int); ``mscoco`` -> (latent, context
float32 77 x D), where the context is the features of one of the image's captions: caption
``hash(index, epoch) mod n_captions`` (deterministic; ``set_epoch`` changes it; U-ViT draws one at
random on every access). Without a path each dataset uses its stand-in (embedded MNIST digits
through random-init encoders, made once into the cache by ``bench.latent.standin`` when a command
calls ``bench.setup.prepare_dataset``; reading here never prepares anything).

For sampling: ``sampling_conditions`` (labels, or validation captions and their features, for
generated samples by global index and seed), ``unconditional`` (the null label 1000 or the empty
caption's features), ``reference_images`` (the real 256 x 256 crops that FID compares against).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from bench.errors import DataError
from .layout import FORMAT, interrupted_hint, is_finished, layout_checksum, open_array, read_meta

from .core import DATASETS, ImageDataset, _Base, register_dataset, with_info
from .sources import FolderSource, expand_path

NULL_LABEL = 1000  # U-ViT: 1,001 label embeddings, 1000 is the null label
TOKENS, CLIP_DIM = 77, 768  # CLIP ViT-L/14: 77 tokens of width 768
LATENT_SIDE, IMAGE_SIDE = 32, 256
_MASK = (1 << 64) - 1


def mix(seed: int, index: np.ndarray, salt: int = 0) -> np.ndarray:
    """splitmix64 of (seed, index, salt): uint64 per index, the same on every machine and batch split."""
    x = np.asarray(index, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        offset = (seed * 0xBF58476D1CE4E5B9 + salt * 0x94D049BB133111EB) & _MASK
        x = x * np.uint64(0x9E3779B97F4A7C15) + np.uint64(offset)
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


# ---------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------


# The stand-in layouts (bench.latent.standin makes them): where they live, keyed by their options.
STANDIN_VERSION = 2  # bump when the stand-in's content changes
STANDIN_DEFAULTS = {"n": 300, "val_n": 100, "autoencoder": "random:tiny", "text_encoder": "random:tiny"}


def standin_dir(dataset: str, cache_dir: str | os.PathLike | None = None, **options) -> Path:
    """Where the cached stand-in of ``dataset`` with ``options`` (defaults filled in) lives:
    ``<cache>/standin/<dataset>-<hash>``."""
    from bench.cache import cache_root

    key = json.dumps({"dataset": dataset, "format": FORMAT, "version": STANDIN_VERSION, **STANDIN_DEFAULTS,
                      **options}, sort_keys=True)
    return cache_root(cache_dir) / "standin" / f"{dataset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def layout_path(name: str, path=None) -> Path:
    """The finished layout of dataset ``name`` at ``path``; None: its stand-in, which must have been
    prepared (bench.setup.prepare_dataset; reading never writes)."""
    if path is None:
        standin = standin_dir(name)
        if not is_finished(standin):
            raise DataError(f"dataset {name!r} has no path and its stand-in is not prepared yet ({standin}); "
                            f"`bench train`, `bench eval`, `bench run` and the sweeps prepare it when they start")
        return standin
    p = expand_path(path)
    if not p.exists():
        raise FileNotFoundError(f"dataset {name!r}: {p} does not exist (the path comes from bench.yaml "
                                f"`datasets.{name}.path` or `--dataset-path`; make it with `bench prepare {name}`)"
                                f"{interrupted_hint(p)}")
    return p


@functools.lru_cache(maxsize=16)
def _meta(path: str, mtime_ns: int, name: str) -> dict:
    return read_meta(path, dataset=name)


def layout_meta(name: str, path=None) -> dict:
    """meta.json of the dataset's layout (checked to be a finished layout of ``name``)."""
    p = layout_path(name, path)
    try:
        mtime = (p / "meta.json").stat().st_mtime_ns
    except OSError:
        mtime = 0
    return _meta(str(p), mtime, name)


def latent_checksum(name: str, path=None) -> str:
    return layout_checksum(layout_path(name, path))


def latent_info(name: str, path=None):
    """DatasetInfo of a particular layout (the stand-in has 10 classes and narrower contexts)."""
    meta = layout_meta(name, path)
    base = DATASETS.get(name).info
    if meta["kind"] == "class":
        return with_info(base, num_classes=int(meta["num_classes"]))
    return with_info(base, context_shape=tuple(meta["context_shape"]))


# ---------------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------------


class LatentDataset(_Base):
    """Rows of a layout's latents (memory-mapped), as float32 tensors."""

    def __init__(self, name: str, root: Path, meta: dict, latents_file: str, *, split: str):
        self.root, self.meta, self.split, self.path = root, meta, split, root
        self.latents = open_array(root, latents_file)
        self.rows = np.arange(len(self.latents), dtype=np.int64)
        self.info = latent_info(name, root)
        self.labels = [-1] * len(self.rows)
        self.classes: list[str] = []

    def _take(self, indices: list[int]) -> None:
        self.rows = self.rows[np.asarray(indices, dtype=np.int64)]

    def latent(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.latents[self.rows[index]], dtype=np.float32))


class LatentClassDataset(LatentDataset):
    """imagenet256 items: (latent float32 4 x 32 x 32, label int)."""

    def __init__(self, name: str, root: Path, meta: dict, *, split: str):
        super().__init__(name, root, meta, "latents.npy", split=split)
        self.labels = np.load(root / "labels.npy").astype(np.int64).tolist()
        self.classes = json.loads((root / "classes.json").read_text())

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.latent(index), self.labels[index]


class LatentTextDataset(LatentDataset):
    """mscoco items: (latent float32 4 x 32 x 32, context float32 77 x D of one of the image's captions)."""

    def __init__(self, name: str, root: Path, meta: dict, *, split: str, epoch: int = 0):
        super().__init__(name, root, meta, f"{split}/latents.npy", split=split)
        self.contexts = open_array(root, f"{split}/contexts.npy")
        self.offsets = np.load(root / f"{split}/caption_offsets.npy")
        self.epoch = epoch

    def set_epoch(self, epoch: int) -> None:
        """Choose the captions of another epoch (item i's caption is hash(i, epoch) mod its captions)."""
        self.epoch = int(epoch)

    def caption_rows(self, indices, epoch: int | None = None) -> np.ndarray:
        """Rows of ``contexts`` that items ``indices`` use in ``epoch`` (default: the current one)."""
        rows = self.rows[np.asarray(indices, dtype=np.int64)]
        start, count = self.offsets[rows], self.offsets[rows + 1] - self.offsets[rows]
        pick = mix(self.epoch if epoch is None else int(epoch), rows, salt=1) % count.astype(np.uint64)
        return start + pick.astype(np.int64)

    def caption_row(self, index: int) -> int:
        return int(self.caption_rows([index])[0])

    def contexts_for(self, indices, epoch: int | None = None) -> torch.Tensor:
        """float32 (n, 77, D): the contexts of items ``indices`` in ``epoch``, one vectorised read (for a
        training loop that keeps the latents in memory and draws captions per epoch)."""
        return torch.from_numpy(np.array(self.contexts[self.caption_rows(indices, epoch)], dtype=np.float32))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        context = np.array(self.contexts[self.caption_row(index)], dtype=np.float32)
        return self.latent(index), torch.from_numpy(context)


def _check_args(name: str, split: str, resolution, flip: bool) -> None:
    if split != "train":
        extra = (" (the validation captions are sampling conditions, `sampling_conditions`, and the "
                 "validation images the FID reference, `reference_images`)") if name == "mscoco" else ""
        raise DataError(f"dataset {name!r} has latents for split 'train' only, not {split!r}{extra}")
    if resolution not in (None, LATENT_SIDE):
        raise DataError(f"dataset {name!r} holds {LATENT_SIDE}x{LATENT_SIDE} latents (of {IMAGE_SIDE}px "
                         f"images); data.resolution must be null or {LATENT_SIDE}, not {resolution}")
    if flip:
        raise DataError(f"dataset {name!r}: latents are not flipped on the fly (a mirrored image's latent "
                         "is not the mirrored latent); imagenet256 layouts hold encoded mirrors already "
                         "(`bench prepare imagenet256`, flip on by default). Set data.flip: false")


@register_dataset("imagenet256", resolution=LATENT_SIDE, channels=4, num_classes=1000, latent=True,
                  image_resolution=IMAGE_SIDE)
def build_imagenet256(path=None, split="train", resolution=None, flip=False):
    """ImageNet 256x256 as SD-autoencoder latents 4x32x32 + labels (bench prepare); no path: MNIST stand-in."""
    _check_args("imagenet256", split, resolution, flip)
    root = layout_path("imagenet256", path)
    return LatentClassDataset("imagenet256", root, layout_meta("imagenet256", root), split=split)


@register_dataset("mscoco", resolution=LATENT_SIDE, channels=4, num_classes=0, latent=True,
                  image_resolution=IMAGE_SIDE, context_shape=(TOKENS, CLIP_DIM))
def build_mscoco(path=None, split="train", resolution=None, flip=False, *, epoch=0):
    """MS-COCO 2014 as SD-autoencoder latents + CLIP caption features 77xD (bench prepare); no path: stand-in."""
    _check_args("mscoco", split, resolution, flip)
    root = layout_path("mscoco", path)
    return LatentTextDataset("mscoco", root, layout_meta("mscoco", root), split=split, epoch=epoch)


# ---------------------------------------------------------------------------------------------------
# Sampling and evaluation
# ---------------------------------------------------------------------------------------------------


def _val_captions(root: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    records = json.loads((root / "val" / "images.json").read_text())
    return records, np.load(root / "val" / "caption_offsets.npy"), open_array(root, "val/contexts.npy")


def sampling_conditions(name: str, path, indices, seed: int) -> dict:
    """Conditions of generated samples with global ``indices`` under run ``seed`` (any batch split gives
    the same ones).

    imagenet256: ``{"labels": LongTensor}``, uniform over the layout's classes (U-ViT: randint(0, 1000);
    the stand-in: its 10) from hash(seed, index). mscoco: ``{"context": FloatTensor (n, 77, D),
    "captions": list[str]}``: sample i takes validation image i mod V and its caption
    hash(seed, i) mod its captions (U-ViT: a random caption of each shuffled validation image).
    """
    idx = np.asarray(torch.as_tensor(indices).reshape(-1).cpu().numpy(), dtype=np.int64)
    meta = layout_meta(name, path)
    if meta["kind"] == "class":
        labels = mix(seed, idx) % np.uint64(int(meta["num_classes"]))
        return {"labels": torch.from_numpy(labels.astype(np.int64))}
    records, offsets, contexts = _val_captions(layout_path(name, path))
    image = idx % len(records)
    counts = offsets[image + 1] - offsets[image]
    k = (mix(seed, idx, salt=2) % counts.astype(np.uint64)).astype(np.int64)
    rows = offsets[image] + k
    captions = [records[j]["captions"][c] for j, c in zip(image.tolist(), k.tolist())]
    context = torch.from_numpy(np.array(contexts[rows], dtype=np.float32))
    return {"context": context, "captions": captions}


def unconditional(name: str, path=None) -> torch.Tensor:
    """The input that means "no condition": the null label 1000 (0-dim LongTensor) for imagenet256, the
    features of the empty caption (77, D) float32 for mscoco."""
    meta = layout_meta(name, path)
    if meta["kind"] == "class":
        return torch.tensor(int(meta.get("null_label", NULL_LABEL)), dtype=torch.long)
    return torch.from_numpy(np.load(layout_path(name, path) / "empty_context.npy").astype(np.float32))


def latent_description(name: str, path=None) -> dict:
    """Columns a result row carries about the latent data: encoders (random-init ones say so), scale,
    and whether the data is a stand-in."""
    meta = layout_meta(name, path)
    return {"autoencoder": meta["autoencoder"]["label"], "latent_scale": meta["autoencoder"]["scale"],
            "text_encoder": meta.get("text_encoder", {}).get("label", ""),
            "encoders_random_init": bool(meta.get("random_init")), "standin": meta.get("standin", "")}


def reference_dir(name: str, path=None) -> Path:
    """The folder of real 256 x 256 reference PNGs of the layout."""
    root = layout_path(name, path)
    return root / layout_meta(name, root)["reference"]["dir"]


def reference_images(name: str, path=None, split: str | None = None) -> ImageDataset:
    """The layout's real reference crops (uint8 PNGs, read as [-1, 1] 3 x 256 x 256 with labels where
    the dataset has them): what FID compares generated images with. ``split`` must be the one they
    come from (imagenet256: train, as U-ViT/ADM; mscoco: val) or None."""
    root = layout_path(name, path)
    meta = layout_meta(name, root)
    ref = json.loads((root / "reference.json").read_text())
    aliases = {"val": ("val", "valid", "validation", "test"), "train": ("train",)}[ref["split"]]
    if split is not None and split not in aliases:
        raise DataError(f"dataset {name!r}: the layout's FID reference images come from split "
                         f"{ref['split']!r}, not {split!r} (set eval.reference_split: {ref['split']})")
    names = [f"{i:06d}.png" for i in range(int(ref["count"]))]
    labels = ref["labels"] if ref.get("labels") is not None else [-1] * len(names)
    info = with_info(DATASETS.get(name).info, resolution=meta["image_resolution"], channels=3)
    ds = ImageDataset(FolderSource(root / meta["reference"]["dir"]), names, labels, info=info,
                      split=ref["split"], mode="RGB", classes=json.loads((root / "classes.json").read_text())
                      if (root / "classes.json").is_file() else [])
    ds.path = root  # the layout, whose checksum keys the reference statistics
    return ds


__all__ = ["sampling_conditions", "unconditional", "latent_description", "reference_images",
           "reference_dir", "layout_path", "layout_meta", "latent_checksum", "latent_info",
           "LatentClassDataset", "LatentTextDataset", "NULL_LABEL"]
