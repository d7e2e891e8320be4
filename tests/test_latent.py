"""bench.latent and the latent datasets: encoders, bench prepare (ImageNet folders, COCO), atomic and
resumable layouts, the embedded-MNIST stand-in, sampling conditions and the FID reference path.

Everything runs on random-init tiny encoders (no model hub) and a few dozen images; no Inception.
"""
import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bench.latent.prepare as prep
from bench.data import (build_dataset, dataset_checksum, dataset_info, reference_images, sampling_conditions,
                        unconditional)
from bench.errors import DataError
from bench.latent import (LayoutError, SpecError, is_finished, load_autoencoder, load_text_encoder,
                          read_meta, verify_layout)
from bench.latent.autoencoder import latent_codec
from bench.latent.images import center_crop_arr, center_crop_lanczos
from bench.latent.standin import captions_for, prepare_standin
from bench.setup import prepare_dataset

DATA = Path(os.environ.get("BENCH_SHARED_DATA")
            or Path(__file__).resolve().parents[1].parent / "shared" / "data")


@pytest.fixture(scope="module")
def codec():
    return load_autoencoder("random:tiny")


@pytest.fixture(scope="module")
def text():
    return load_text_encoder("random:tiny")


def real_images(k: int) -> list[Image.Image]:
    """k real photos (CelebA's 89x109 faces: not square, so the crops matter), else generated ones."""
    zpath = DATA / "celeba-10k-jpg.zip"
    if zpath.is_file():
        with zipfile.ZipFile(zpath) as z:
            names = sorted(n for n in z.namelist() if n.endswith(".jpg"))[:k]
            return [Image.open(io.BytesIO(z.read(n))).convert("RGB") for n in names]
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (90 + 7 * i, 120, 3), dtype=np.uint8)) for i in range(k)]


def imagenet_folder(root: Path, per_class=(3, 2)) -> Path:
    images = iter(real_images(sum(per_class)))
    for wnid, k in zip(("n02", "n01"), per_class):  # sorted wnids: n01 -> 0, n02 -> 1
        (root / "train" / wnid).mkdir(parents=True)
        for j in range(k):
            next(images).save(root / "train" / wnid / f"{wnid}_{j}.JPEG", quality=95)
    return root


def coco_folder(root: Path) -> Path:
    images = iter(real_images(6))
    (root / "train2014").mkdir(parents=True)
    (root / "annotations").mkdir()
    ann = {"train": {"images": [], "annotations": []}, "val": {"images": [], "annotations": []}}
    for split, ids in (("train", (9, 3, 5, 7)), ("val", (42, 11))):
        for image_id in ids:
            name = f"COCO_{split}2014_{image_id:012d}.jpg"
            ann[split]["images"].append({"id": image_id, "file_name": name})
            if split == "train":
                next(images).save(root / "train2014" / name)
            else:  # val images inside the official zip
                buf = io.BytesIO()
                next(images).save(buf, format="JPEG")
                with zipfile.ZipFile(root / "val2014.zip", "a") as z:
                    z.writestr(f"val2014/{name}", buf.getvalue())
            n_caps = 0 if image_id == 7 else (6 if image_id == 3 else 5)  # 7: no caption -> left out
            for c in range(n_caps):
                ann[split]["annotations"].append({"id": 1000 * image_id + c, "image_id": image_id,
                                                  "caption": f"picture {image_id} caption {c}"})
    for split in ("train", "val"):
        (root / "annotations" / f"captions_{split}2014.json").write_text(json.dumps(ann[split]))
    return root


# ---------------------------------------------------------------------------------------------------
# Encoders
# ---------------------------------------------------------------------------------------------------


def test_tiny_autoencoder_shapes_scale_and_determinism(codec):
    x = torch.rand(3, 3, 256, 256) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 4, 32, 32) and z.dtype == torch.float32
    assert codec.random_init and "NOT the SD autoencoder" in codec.label and codec.scale == 0.18215
    again = load_autoencoder("random:tiny")
    assert again.fingerprint == codec.fingerprint and torch.equal(again.encode(x), z)
    unscaled = load_autoencoder("random:tiny", scale=1.0)
    torch.testing.assert_close(unscaled.encode(x) * 0.18215, z)
    y = codec.decode(z)
    assert y.shape == (3, 3, 256, 256) and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(unscaled.decode(z / 0.18215), y)
    assert codec.encode(x[:1]).shape == (1, 4, 32, 32)  # batches of any size, same numbers
    torch.testing.assert_close(codec.encode(x[1:]), z[1:], atol=1e-5, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks`")  # huggingface_hub's own, offline
def test_autoencoder_from_local_folder_and_bad_specs(codec, tmp_path, monkeypatch):
    codec.vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    local = load_autoencoder(str(tmp_path / "vae"))
    assert not local.random_init and str(tmp_path / "vae") in local.label
    assert local.fingerprint == codec.fingerprint
    (tmp_path / "pipe").mkdir()
    os.rename(tmp_path / "vae", tmp_path / "pipe" / "vae")  # a pipeline folder: its vae/ is used
    assert load_autoencoder(str(tmp_path / "pipe")).fingerprint == codec.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecError, match="safetensors"):
        load_autoencoder(str(tmp_path / "empty"))
    with pytest.raises(SpecError, match="random:tiny"):
        load_autoencoder("random:huge")
    with pytest.raises(SpecError, match="not a local directory"):
        load_autoencoder("no such thing")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no 30 s of retries here
    with pytest.raises(SpecError, match="local directory"):
        load_autoencoder("stabilityai/sd-vae-ft-ema")


def test_text_encoder_shapes_and_captions(text, tmp_path):
    caps = ["a photo of the handwritten digit seven", "a photo of the handwritten digit eight", ""]
    f = text.encode(caps)
    assert f.shape == (3, 77, 64) and text.dim == 64 and text.random_init and "NOT CLIP" in text.label
    assert not torch.allclose(f[0], f[1]) and torch.equal(text.encode(caps[:1])[0], f[0])
    ids = text.tokenize(["x " * 200, ""])
    assert ids.shape == (2, 77)  # truncated and padded to 77
    assert ids[1, 0] == text.tokenizer.bos_token_id and (ids[1, 1:] == text.tokenizer.eos_token_id).all()
    text.model.save_pretrained(tmp_path / "clip")
    text.tokenizer.save_pretrained(tmp_path / "clip")
    local = load_text_encoder(str(tmp_path / "clip"))
    assert not local.random_init and torch.allclose(local.encode(caps), f, atol=1e-6)


def test_crops_follow_uvit():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (600, 1100, 3), dtype=np.uint8))
    a, b = center_crop_arr(img), center_crop_lanczos(img)
    assert a.shape == b.shape == (256, 256, 3) and a.dtype == b.dtype == np.uint8
    # guided-diffusion's crop: one BOX halving (600 >= 512) to 550x300, BICUBIC to 469x256, centre
    half = img.resize((550, 300), Image.BOX).resize((469, 256), Image.BICUBIC)
    assert np.array_equal(a, np.asarray(half)[:, 106:362])


# ---------------------------------------------------------------------------------------------------
# ImageNet layout
# ---------------------------------------------------------------------------------------------------

KW = dict(autoencoder="random:tiny", num_workers=0, device="cpu", progress=False, batch_size=2)


def test_prepare_imagenet256_layout_and_dataset(tmp_path):
    src = imagenet_folder(tmp_path / "src")
    out = prep.prepare_imagenet256(src, tmp_path / "in256", reference_count=3, **KW)
    meta = read_meta(out, "imagenet256")
    assert meta["count"] == 10 and meta["source_images"] == 5 and meta["flip"] and meta["random_init"]
    assert meta["num_classes"] == 2 and meta["null_label"] == 1000 and meta["latent_shape"] == [4, 32, 32]
    assert meta["autoencoder"]["spec"] == "random:tiny" and meta["scale"] == meta["autoencoder"]["scale"] != 0.18215
    assert json.loads((out / "classes.json").read_text()) == ["n01", "n02"]
    assert np.load(out / "labels.npy").tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]
    ds = build_dataset("imagenet256", out)
    z, y = ds[3]
    assert z.shape == (4, 32, 32) and z.dtype == torch.float32 and y == 0 and len(ds) == 10
    assert dataset_info("imagenet256", path=out).num_classes == 2
    assert len(build_dataset("imagenet256", out, limit=4)) == 4
    # item 2i + 1 is the mirror image's latent, not the mirrored latent
    codec = latent_codec("imagenet256", out)
    img = torch.from_numpy(center_crop_arr(Image.open(src / "train/n01/n01_0.JPEG").convert("RGB")))
    x = img.permute(2, 0, 1)[None].float() / 127.5 - 1
    torch.testing.assert_close(ds[0][0], codec.encode(x)[0], atol=5e-3, rtol=1e-3)  # float16 on disk
    torch.testing.assert_close(ds[1][0], codec.encode(x.flip(-1))[0], atol=5e-3, rtol=1e-3)
    assert not torch.allclose(ds[1][0], ds[0][0].flip(-1), atol=5e-2)
    ref = reference_images("imagenet256", out, "train")
    assert len(ref) == 3 and ref[0][0].shape == (3, 256, 256) and ref.labels == [0, 1, 1]
    assert json.loads((out / "reference.json").read_text())["source_index"] == [0, 2, 4]
    assert verify_layout(out) == []
    checksum = dataset_checksum("imagenet256", out)
    assert checksum == dataset_checksum("imagenet256", str(out)) and len(checksum) == 64
    assert prep.prepare_imagenet256(src, out, reference_count=3, **KW) == out  # done: nothing redone
    with pytest.raises(LayoutError, match="other options"):
        prep.prepare_imagenet256(src, out, reference_count=2, **KW)
    np.save(out / "labels.npy", np.zeros(10, np.int64))
    assert verify_layout(out) == ["labels.npy"]
    for bad, match in (({"split": "val"}, "split 'train' only"), ({"resolution": 64}, "32x32"),
                       ({"flip": True}, "not flipped")):
        with pytest.raises(ValueError, match=match):
            build_dataset("imagenet256", out, **bad)
    with pytest.raises(LayoutError, match="not a finished"):
        build_dataset("imagenet256", src)


def test_interrupted_prepare_is_never_finished_and_resumes(tmp_path, monkeypatch):
    src = imagenet_folder(tmp_path / "src")
    whole = prep.prepare_imagenet256(src, tmp_path / "whole", flip=False, **KW)
    calls = {"n": 0}
    real = prep.LatentCodec.encode

    def dies(self, *a, **k):
        calls["n"] += 1
        if calls["n"] > 2:  # the scale probe, then one batch of two images
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(prep.LatentCodec, "encode", dies)
    monkeypatch.setattr(prep, "COMMIT_SECONDS", 0.0)  # record progress after every batch
    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_imagenet256(src, out, flip=False, **KW)
    assert not out.exists() and not is_finished(out) and (tmp_path / "cut.partial").is_dir()
    with pytest.raises(FileNotFoundError, match="interrupted"):
        build_dataset("imagenet256", out)
    with pytest.raises(LayoutError, match="interrupted"):
        read_meta(out)
    with pytest.raises(LayoutError, match="not a finished"):
        read_meta(out.with_name("cut.partial"))
    monkeypatch.setattr(prep.LatentCodec, "encode", real)
    progress = json.loads((tmp_path / "cut.partial" / "progress.json").read_text())
    assert progress["counts"] == {"images": 2}
    prep.prepare_imagenet256(src, out, flip=False, **KW)  # resumes at image 2
    assert is_finished(out) and not (tmp_path / "cut.partial").exists()
    assert np.array_equal(np.load(out / "latents.npy"), np.load(whole / "latents.npy"))
    assert read_meta(out)["files"] == read_meta(whole)["files"]
    assert dataset_checksum("imagenet256", out) == dataset_checksum("imagenet256", whole)  # content, not time


# ---------------------------------------------------------------------------------------------------
# MS-COCO layout
# ---------------------------------------------------------------------------------------------------


def test_prepare_mscoco_layout_dataset_and_conditions(tmp_path, text):
    src = coco_folder(tmp_path / "coco")
    out = prep.prepare_mscoco(src, tmp_path / "coco256", text_encoder="random:tiny", **KW)
    meta = read_meta(out, "mscoco")
    assert meta["train"] == {"images": 3, "captions": 16} and meta["val"] == {"images": 2, "captions": 10}
    assert meta["context_shape"] == [77, 64] and meta["text_encoder"]["random_init"]
    records = json.loads((out / "train" / "images.json").read_text())
    assert [r["id"] for r in records] == [3, 5, 9] and len(records[0]["captions"]) == 6  # by id; all captions
    ds = build_dataset("mscoco", out)
    z, c = ds[0]
    assert z.shape == (4, 32, 32) and c.shape == (77, 64) and c.dtype == torch.float32
    offsets = np.load(out / "train" / "caption_offsets.npy")
    assert offsets.tolist() == [0, 6, 11, 16]
    rows = {ds.caption_row(0)}
    for epoch in range(1, 8):
        ds.set_epoch(epoch)
        rows.add(ds.caption_row(0))
    assert len(rows) > 1 and rows <= set(range(6))  # another caption of the same image per epoch
    torch.testing.assert_close(ds[0][1], text.encode([records[0]["captions"][ds.caption_row(0)]])[0], atol=2e-3,
                               rtol=1e-2)  # float16 on disk
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    assert x.shape == (3, 4, 32, 32) and y.shape == (3, 77, 64)  # contexts stack (preload)
    assert torch.equal(ds.contexts_for([0, 1, 2]), y) and not torch.equal(ds.contexts_for([0, 1, 2], epoch=5), y)
    empty = unconditional("mscoco", out)
    assert empty.shape == (77, 64) and torch.allclose(empty, text.encode([""])[0], atol=1e-6)
    cond = sampling_conditions("mscoco", out, torch.arange(5), seed=3)
    val = json.loads((out / "val" / "images.json").read_text())
    assert [v["id"] for v in val] == [11, 42] and cond["context"].shape == (5, 77, 64)
    for i, caption in enumerate(cond["captions"]):
        assert caption in val[i % 2]["captions"]
    torch.testing.assert_close(cond["context"][1], text.encode([cond["captions"][1]])[0], atol=2e-3, rtol=1e-2)
    assert len(reference_images("mscoco", out, "val")) == 2
    with pytest.raises(ValueError, match="reference_split: val"):
        reference_images("mscoco", out, "train")


# ---------------------------------------------------------------------------------------------------
# Stand-in, sampling conditions, FID reference
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def small_standin(tmp_path, monkeypatch):
    import bench.latent.standin as standin

    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(standin.STANDIN_DEFAULTS, "n", 20)
    monkeypatch.setitem(standin.STANDIN_DEFAULTS, "val_n", 10)
    prepare_dataset("imagenet256")  # what train, eval, run and sweeps do when they start
    prepare_dataset("mscoco")
    return tmp_path / "cache"


def test_reading_a_stand_in_never_prepares_it(tmp_path, monkeypatch):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    for read in (lambda: dataset_checksum("imagenet256"), lambda: dataset_info("mscoco"),
                 lambda: build_dataset("imagenet256")):
        with pytest.raises(DataError, match=r"stand-in is not prepared yet.*bench train"):
            read()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*"))


def test_standin_is_prepared_once_and_labelled(small_standin):
    ds = build_dataset("imagenet256")  # no path: the stand-in the fixture prepared into the cache
    meta = read_meta(ds.path)
    assert meta["standin"].endswith("(not ImageNet)") and len(ds) == 20 and meta["num_classes"] == 10
    assert str(ds.path).startswith(str(small_standin)) and sorted(set(ds.labels)) == list(range(10))
    assert dataset_info("imagenet256").num_classes == 10 and int(unconditional("imagenet256")) == 1000
    mtime = (ds.path / "meta.json").stat().st_mtime_ns
    assert build_dataset("imagenet256").path == ds.path and (ds.path / "meta.json").stat().st_mtime_ns == mtime
    assert reference_images("imagenet256", None, "train").labels[:12] == list(range(10)) + [0, 1]  # round-robin
    labels = sampling_conditions("imagenet256", None, torch.arange(200), seed=0)["labels"]
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(10))
    coco = build_dataset("mscoco")
    assert read_meta(coco.path)["standin"].endswith("(not MS-COCO)") and coco[0][1].shape == (77, 64)
    assert sampling_conditions("mscoco", None, torch.arange(3), 0)["captions"][0] in captions_for(0)
    assert latent_codec("mscoco").random_init and len(reference_images("mscoco", None, "val")) == 10


def test_sampling_conditions_are_deterministic_and_batch_independent(small_standin):
    whole = sampling_conditions("imagenet256", None, torch.arange(10), seed=5)["labels"]
    parts = [sampling_conditions("imagenet256", None, torch.arange(a, b), seed=5)["labels"]
             for a, b in ((0, 4), (4, 10))]
    assert torch.equal(whole, torch.cat(parts))
    assert torch.equal(whole, sampling_conditions("imagenet256", None, torch.arange(10), seed=5)["labels"])
    assert not torch.equal(whole, sampling_conditions("imagenet256", None, torch.arange(10), seed=6)["labels"])
    a = sampling_conditions("mscoco", None, torch.tensor([7, 2]), seed=1)
    b = sampling_conditions("mscoco", None, torch.arange(8), seed=1)
    assert a["captions"] == [b["captions"][7], b["captions"][2]] and torch.equal(a["context"][0], b["context"][7])


def test_standin_explicit_folder_and_command(tmp_path):
    from bench.latent.command import prepare_command

    out = prepare_standin("mscoco", tmp_path / "s", n=10, val_n=10)
    assert read_meta(out)["train"]["images"] == 10 and read_meta(out)["val"]["images"] == 10
    with pytest.raises(ValueError, match="no stand-in"):
        prepare_standin("cifar10", tmp_path / "t", n=10)
    out = prepare_command("imagenet256", tmp_path / "cmd", standin=True, n=10, progress=False)
    assert read_meta(out)["count"] == 10 and read_meta(out)["standin"]
    for kwargs, match in (({"standin": True, "source": "x"}, "not both"), ({}, "not neither"),
                          ({"standin": True, "per_class": 3}, "--per-class do not apply"),
                          ({"source": "x", "text_encoder": "random:tiny"}, "--text-encoder"),
                          ({"source": "x", "scale": "big"}, "number or 'auto'")):
        with pytest.raises(ValueError, match=match):
            prepare_command("imagenet256", tmp_path / "bad", **kwargs)
    with pytest.raises(ValueError, match="valid: imagenet256, mscoco"):
        prepare_command("cifar10", tmp_path / "bad", standin=True)


def test_reference_statistics_use_the_layout_images(small_standin, monkeypatch):
    import bench.evaluate.fid as fidmod

    seen = []

    def fake_features(ds, **kwargs):
        seen.append(ds)
        return np.random.default_rng(len(seen)).normal(size=(len(ds), 8)).astype(np.float32)

    monkeypatch.setattr(fidmod, "compute_features", fake_features)
    stats = fidmod.reference_statistics("imagenet256", None, "train", resolution=32, per_class=1,
                                        cache_dir=small_standin)
    (ds,) = seen
    assert len(ds) == 10 and ds[0][0].shape == (3, 256, 256) and stats.n == 10
    assert stats.meta["resolution"] == 256 and stats.meta["checksum"] == dataset_checksum("imagenet256")
    again = fidmod.reference_statistics("imagenet256", None, "train", resolution=None, per_class=1,
                                        cache_dir=small_standin)
    assert len(seen) == 1 and again.path == stats.path  # cached by the layout checksum
    fidmod.reference_statistics("mscoco", None, "val", limit=4, cache_dir=small_standin)
    assert len(seen[-1]) == 4 and seen[-1][0][0].shape == (3, 256, 256)
