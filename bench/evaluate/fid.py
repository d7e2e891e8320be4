"""FID and KID with torch-fidelity's InceptionV3 (TF 2015-12-05 weights, loaded from a local file).

Features are torch-fidelity's ``'2048'`` layer (the pool features; torch-fidelity's default layer for
both FID and KID). Images go in as uint8 N x 3 x H x W (grey images are repeated to three channels,
float images in [-1, 1] are quantised as a PNG writer would: round((x + 1) * 127.5)); the extractor
resizes them to 299x299 itself, with TensorFlow 1.x's bilinear rule.

Reference statistics are computed once from the dataset files, with the training preprocessing
(``bench.data.build_dataset``, no flip), and cached as an ``.npz`` keyed by the dataset checksum, the
split, the subset and the resolution (mu and sigma in float64, n, and the float32 features for KID).

    >>> ref = reference_statistics("cifar10", "data/cifar10-{split}-jpg.zip", per_class=1000)
    >>> fid_kid(samples, ref)  # samples: uint8 or [-1, 1] float N x C x H x W, or a folder of PNGs
    {'fid': ..., 'kid_mean': ..., 'kid_std': ..., 'n_generated': ..., 'n_reference': 10000, ...}

All sample counts are explicit: a reference is "the first ``per_class`` of each class" and/or "the
first ``limit``" of the dataset's documented order, and every result names n_generated and
n_reference. At small n FID is biased upwards (it falls roughly like 1/n): compare FIDs only at equal
sample counts.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bench.atomic import atomic_write
from bench.errors import DataError

from .inception import (WEIGHTS_NAME, InceptionWeightsNotFound, cache_root, ensure_inception_weights,
                        load_converted)

FEATURE = "2048"  # torch-fidelity: get_default_feature_layer_for_metric("fid") == ("kid") == "2048"
KID_SUBSETS = 100  # torch-fidelity's defaults (after Binkowski et al. 2018)
KID_SUBSET_SIZE = 1000
KID_SEED = 2020
STATS_FORMAT = 1  # bump when the cached statistics change meaning
_EXTRACTORS: dict[tuple[str, str], torch.nn.Module] = {}


# ---------------------------------------------------------------------------------------------------
# Feature extraction
# ---------------------------------------------------------------------------------------------------


def feature_extractor(device: str | torch.device = "cpu", cache_dir: str | os.PathLike | None = None,
                      allow_download: bool = False) -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 (feature '2048') on ``device``, batch norms folded into the
    convolutions (`fold_batch_norms`), channels-last, eval,
    weights from ``ensure_inception_weights`` (built once per device and weights file).

    ``allow_download``: where no local weights exist, let torch-fidelity fetch its own from GitHub.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        path: str | None = str(ensure_inception_weights(cache_dir))
    except InceptionWeightsNotFound:
        if not allow_download:
            raise
        path = None  # torch-fidelity downloads pt_inception-2015-12-05 into torch.hub's cache
    key = (str(torch.device(device)), path or "torch-fidelity-download")
    if key not in _EXTRACTORS:
        if path is not None:
            load_converted(path)  # tensors only; torch-fidelity then reads it with weights_only=False
        model = FeatureExtractorInceptionV3("inception-v3-compat", [FEATURE],
                                            feature_extractor_weights_path=path)
        model = fold_batch_norms(model.eval())
        _EXTRACTORS[key] = model.to(device).to(memory_format=torch.channels_last).eval()
    return _EXTRACTORS[key]


@torch.no_grad()
def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode BatchNorm2d that follows a bias-free Conv2d (torch-fidelity's BasicConv2d:
    conv, bn, relu) into the convolution: W' = W * g / sqrt(v + eps), b' = beta - m * g / sqrt(v + eps).

    The same function of the input, one pass over every activation fewer (about 1.15x on two CPU
    cores; `bench perf`); the features differ from torch-fidelity's only by float rounding (about 1e-6
    relative, checked in tests/test_fid.py)."""
    for module in list(model.modules()):
        conv, bn = getattr(module, "conv", None), getattr(module, "bn", None)
        if not (isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d) and conv.bias is None):
            continue
        if bn.training or not bn.affine or bn.running_var is None:
            raise ValueError("fold_batch_norms needs eval-mode, affine batch norms with running statistics")
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        folded = torch.nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                 conv.padding, conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
                                 device=conv.weight.device, dtype=conv.weight.dtype)
        folded.weight.copy_(conv.weight * scale[:, None, None, None])
        folded.bias.copy_(bn.bias - bn.running_mean * scale)
        folded.requires_grad_(False)  # as torch-fidelity leaves its extractor
        module.conv, module.bn = folded, torch.nn.Identity()
    return model


def to_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x H x W from uint8 or float-in-[-1, 1] N x C x H x W (C = 1 is repeated to 3)."""
    x = torch.as_tensor(images)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images N x C x H x W with C = 1 or 3, got {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"expected uint8 or float images in [-1, 1], got {x.dtype}")
        x = ((x.float() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _batches(images, batch_size: int, num_workers: int):
    """(number of images, iterator over uint8 N x 3 x H x W batches) of any accepted input."""
    if isinstance(images, (str, os.PathLike)):
        images = image_folder(images)
    if isinstance(images, (torch.Tensor, np.ndarray)):
        x = torch.as_tensor(images)
        x = x.unsqueeze(0) if x.dim() == 3 else x
        return len(x), (to_uint8(x[i:i + batch_size]) for i in range(0, len(x), batch_size))
    if isinstance(images, Dataset):
        loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        first = lambda b: b[0] if isinstance(b, (list, tuple)) else b  # noqa: E731  (image, label)
        return len(images), (to_uint8(first(b)) for b in loader)
    raise TypeError("images must be a tensor, an array, a Dataset or a folder path, not "
                    f"{type(images).__name__}")


def image_folder(path: str | os.PathLike) -> Dataset:
    """The images in a folder (any nesting, natural file-name order), as RGB (grey repeated)."""
    from bench.data import build_dataset

    return build_dataset("imagefolder", path, split="all")


@torch.no_grad()
def compute_features(images, extractor: torch.nn.Module | None = None, device: str | torch.device = "cpu",
                     batch_size: int = 50, progress: bool = False, num_workers: int = 0) -> np.ndarray:
    """float32 N x 2048 Inception features.

    ``images``: uint8 or float-in-[-1, 1] N x C x H x W (tensor or array; C = 1 or 3), a Dataset of
    such images (or of (image, label) items), or a folder of image files.
    """
    extractor = extractor if extractor is not None else feature_extractor(device)
    device = next(extractor.parameters()).device
    n, batches = _batches(images, batch_size, num_workers)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="img", desc="Inception features")
    out = []
    for batch in batches:
        batch = batch.to(device).contiguous(memory_format=torch.channels_last)
        out.append(extractor(batch)[0].float().cpu())
        if bar is not None:
            bar.update(len(batch))
    if bar is not None:
        bar.close()
    feats = torch.cat(out).numpy() if out else np.zeros((0, 2048), np.float32)
    if len(feats) != n:
        raise RuntimeError(f"expected {n} feature rows, got {len(feats)}")
    return feats


def save_pngs(images, folder: str | os.PathLike) -> list[Path]:
    """Write images (as accepted by ``to_uint8``) losslessly as ``folder/000000.png, ...``; grey images
    (C = 1) as 8-bit grey PNGs."""
    from PIL import Image

    x = torch.as_tensor(images)
    x = x.unsqueeze(0) if x.dim() == 3 else x
    grey = x.shape[1] == 1
    u8 = to_uint8(x)[:, :1] if grey else to_uint8(x)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(u8.permute(0, 2, 3, 1).numpy()):
        p = folder / f"{i:06d}.png"
        Image.fromarray(img[..., 0] if grey else img, "L" if grey else "RGB").save(p)
        paths.append(p)
    return paths


# ---------------------------------------------------------------------------------------------------
# Statistics and distances
# ---------------------------------------------------------------------------------------------------


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) in float64: the mean and the unbiased covariance (np.cov, rows are samples)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least two feature rows, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64, with scipy's sqrtm (TTUR/pytorch-fid).

    The standard fix: where the product's square root is not finite (singular covariances), eps is
    added to both diagonals; a complex result with a diagonal imaginary part above 1e-3 is an error.
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes differ: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_from_features(f1: np.ndarray, f2: np.ndarray) -> float:
    """The same Frechet distance from the feature rows themselves, exactly and without sqrtm.

    With centred rows A (n1 x d), B (n2 x d), S1 = A'A / (n1 - 1) and S2 = B'B / (n2 - 1), the
    non-zero eigenvalues of S1 S2 are the squared singular values of A B' / sqrt((n1 - 1)(n2 - 1)),
    so tr (S1 S2)^(1/2) is that matrix's nuclear norm. Costs an n1 x n2 SVD: use it when
    min(n1, n2) < d, where the covariances are singular and sqrtm is slow and ill-conditioned.
    """
    a, b = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    n1, n2 = len(a), len(b)
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    a, b = a - mu1, b - mu2
    scale = np.sqrt((n1 - 1) * (n2 - 1))
    tr_covmean = np.linalg.svd(a @ b.T, compute_uv=False).sum() / scale
    diff = mu1 - mu2
    return float(diff @ diff + (a * a).sum() / (n1 - 1) + (b * b).sum() / (n2 - 1) - 2 * tr_covmean)


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> dict[str, float]:
    """KID through torch-fidelity's code: the unbiased MMD^2 with the cubic polynomial kernel
    (x.y / d + 1)^3, averaged over ``subsets`` random subsets of ``min(subset_size, n1, n2)`` rows each
    (without replacement; where that is all rows of both sets, every subset is the same and the
    std is 0)."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    size = int(min(subset_size, len(f1), len(f2)))
    t1, t2 = (torch.from_numpy(np.asarray(f, np.float32)) for f in (f1, f2))
    out = kid_features_to_metric(t1, t2, kid_subsets=subsets, kid_subset_size=size, rng_seed=seed,
                                 verbose=False)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD],
            "kid_subsets": subsets, "kid_subset_size": size}


# ---------------------------------------------------------------------------------------------------
# Reference statistics
# ---------------------------------------------------------------------------------------------------


@dataclass
class ReferenceStats:
    """Inception statistics of a dataset subset: mu, sigma (float64), n, the features (float32) and
    what they describe (dataset, split, subset, resolution, checksum, weights)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    features: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStats":
        with np.load(Path(path), allow_pickle=False) as z:
            features = z["features"] if "features" in z.files else None
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {}
            return cls(z["mu"], z["sigma"], int(z["n"]), features, meta, Path(path))

    def save(self, path: str | os.PathLike) -> Path:
        """Written atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                      meta=np.array(json.dumps(self.meta)))
        if self.features is not None:
            arrays["features"] = self.features
        atomic_write(path, lambda f: np.savez(f, **arrays))
        self.path = path
        return path


def subset_description(limit: int | None = None, per_class: int | None = None) -> str:
    """'all', 'per_class=1000', 'limit=5000' or 'per_class=500,limit=2000' (per_class applies first)."""
    parts = ([f"per_class={per_class}"] if per_class is not None else []) + \
            ([f"limit={limit}"] if limit is not None else [])
    return ",".join(parts) or "all"


def reference_dataset(dataset: str, path=None, split: str = "train", resolution: int | None = None,
                      limit: int | None = None, per_class: int | None = None, **dataset_kwargs) -> Dataset:
    """The subset the reference statistics describe: ``build_dataset`` (no flip), then the first
    ``per_class`` items of each class, then the first ``limit`` items, in the dataset's order.
    Latent datasets (imagenet256, mscoco): the real 256 x 256 crops kept in the layout
    (``bench.data.reference_images``; ``resolution`` is ignored), never the latents."""
    from bench.data import build_dataset, class_balanced_subset, is_latent, reference_images

    if is_latent(dataset):  # the layout's real 256 x 256 crops, not its latents
        ds = reference_images(dataset, path, split)
    else:
        ds = build_dataset(dataset, path, split=split, resolution=resolution, flip=False, **dataset_kwargs)
    if per_class is not None:
        ds = class_balanced_subset(ds, per_class)
    if limit is not None:
        n = min(limit, len(ds))
        ds = ds.subset(range(n)) if hasattr(ds, "subset") else torch.utils.data.Subset(ds, range(n))
    return ds


def reference_key(dataset: str, path=None, split: str = "train", resolution: int | None = None,
                  limit: int | None = None, per_class: int | None = None) -> dict[str, Any]:
    """What identifies cached reference statistics (the dataset file's checksum, not its path)."""
    from bench.data import dataset_checksum, dataset_info, is_latent

    if is_latent(dataset):  # statistics of the decoded-image space: the reference crops' size
        resolution = dataset_info(dataset, path=path).image_resolution
    return {"format": STATS_FORMAT, "dataset": dataset, "split": split,
            "checksum": dataset_checksum(dataset, path, split),
            "resolution": resolution or dataset_info(dataset).resolution,
            "subset": subset_description(limit, per_class), "feature": FEATURE, "weights": WEIGHTS_NAME}


def reference_cache_path(key: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    subset = key["subset"].replace("=", "").replace(",", "-")
    name = f"{key['dataset']}-{key['split']}-{key['resolution']}px-{subset}-{key['checksum'][:12]}-{digest}.npz"
    return cache_root(cache_dir) / "fid_stats" / name


def reference_statistics(dataset: str, path=None, split: str = "train", resolution: int | None = None,
                         limit: int | None = None, per_class: int | None = None,
                         cache_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu",
                         batch_size: int = 50, progress: bool = False, extractor: torch.nn.Module | None = None,
                         **dataset_kwargs) -> ReferenceStats:
    """Inception statistics of a dataset subset (see ``reference_dataset``), computed once and cached
    under ``<cache>/fid_stats/`` keyed by ``reference_key`` (the dataset checksum + split + subset +
    resolution + weights)."""
    key = reference_key(dataset, path, split, resolution, limit, per_class)
    cached = reference_cache_path(key, cache_dir)
    if cached.is_file():
        stats = ReferenceStats.load(cached)
        if {k: stats.meta.get(k) for k in key} == key:
            return stats
    ds = reference_dataset(dataset, path, split, resolution, limit, per_class, **dataset_kwargs)
    features = compute_features(ds, extractor=extractor, device=device, batch_size=batch_size,
                                progress=progress)
    mu, sigma = feature_statistics(features)
    stats = ReferenceStats(mu, sigma, len(features), features, {**key, "n": len(features)})
    stats.save(cached)
    return stats


# ---------------------------------------------------------------------------------------------------
# FID and KID of generated images
# ---------------------------------------------------------------------------------------------------


def fid_kid(generated, reference: ReferenceStats | str | os.PathLike, *,
            extractor: torch.nn.Module | None = None, device: str | torch.device = "cpu", batch_size: int = 50,
            save_png_dir: str | os.PathLike | None = None, kid_subsets: int = KID_SUBSETS,
            kid_subset_size: int = KID_SUBSET_SIZE, kid_seed: int = KID_SEED,
            progress: bool = False) -> dict[str, Any]:
    """FID and KID of ``generated`` against ``reference`` (ReferenceStats or its .npz).

    ``generated``: uint8 or float-in-[-1, 1] N x C x H x W in memory, or a folder of image files.
    ``save_png_dir``: also write in-memory images there as lossless PNGs (the features are the same).
    FID: ``frechet_distance_from_features`` (exact) where both feature sets are at hand and
    min(n_generated, n_reference) < 2048, else ``frechet_distance`` (sqrtm). KID: see
    ``kernel_inception_distance`` (needs the reference features; NaN without them).
    """
    ref = reference if isinstance(reference, ReferenceStats) else ReferenceStats.load(reference)
    if save_png_dir is not None:
        if isinstance(generated, (str, os.PathLike)):
            raise ValueError("save_png_dir is for images held in memory; these are already files")
        save_pngs(generated, save_png_dir)
    feats = compute_features(generated, extractor=extractor, device=device, batch_size=batch_size,
                             progress=progress)
    n_gen, d = feats.shape
    if n_gen < 2:  # a covariance needs two images; one would give FID nan
        where = f" in {generated}" if isinstance(generated, (str, os.PathLike)) else ""
        raise DataError(f"FID needs at least 2 generated images, got {n_gen}{where}")
    if ref.features is not None and min(n_gen, ref.n) < d:
        fid, method = frechet_distance_from_features(feats, ref.features), "nuclear-norm"
    else:
        fid, method = frechet_distance(*feature_statistics(feats), ref.mu, ref.sigma), "sqrtm"
    if ref.features is not None:
        kid = kernel_inception_distance(feats, ref.features, kid_subsets, kid_subset_size, kid_seed)
    else:
        kid = {"kid_mean": float("nan"), "kid_std": float("nan"), "kid_subsets": 0, "kid_subset_size": 0}
    return {"fid": fid, **{k: kid[k] for k in ("kid_mean", "kid_std")}, "n_generated": int(n_gen),
            "n_reference": int(ref.n), "kid_subsets": kid["kid_subsets"],
            "kid_subset_size": kid["kid_subset_size"],
            "fid_method": method, "reference_dataset": ref.meta.get("dataset", ""),
            "reference_split": ref.meta.get("split", ""), "reference_subset": ref.meta.get("subset", ""),
            "reference_checksum": ref.meta.get("checksum", "")}
