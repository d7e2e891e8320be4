"""Every method trains and samples on both latent datasets through `bench run` (issue 7).

The datasets are the stand-ins (embedded MNIST digits, random-init autoencoder and text encoder),
prepared small into a temporary cache; the rows must say so.
"""
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.store import read_rows
from methods import METHODS


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    import bench.latent.standin as standin

    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("latent_runs")
    mp.setenv("BENCH_CACHE", str(root / "cache"))
    mp.setitem(standin.STANDIN_DEFAULTS, "n", 24)
    mp.setitem(standin.STANDIN_DEFAULTS, "val_n", 8)
    yield root
    mp.undo()


def _run(root, dataset, method, *extra):
    args = ["run", "--quiet", "--dataset", dataset, "--method", method, "--samples", "3", "--steps", "3",
            "--results", str(root / "results"), "--set", f"run.runs_dir={root / 'runs'}",
            "--set", "eval.fid=false", "--set", "train.steps=2", "--set", "train.batch_size=8",
            "--set", "model.kwargs={embed_dim: 32, num_heads: 2, patch_size: 4}", "--set", "sample.batch_size=3",
            "--set", "eval.loss_images=4", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)


@pytest.mark.parametrize("dataset", ["imagenet256", "mscoco"])
def test_every_method_runs_on_the_latent_datasets(cache, dataset):
    for method in METHODS.names():
        threshold = {"deediff": 0.5, "bertxit": 0.5, "calm": 0.5, "static": 6}.get(method)
        extra = [] if threshold is None else ["--set", f"sample.threshold={threshold}"]
        if method == "pruning":  # a few calibration images and network times
            extra += ["--set", "method.calib_images=4", "--set", "method.max_steps=3"]
        _run(cache, dataset, method, *extra)
    rows = [r for r in read_rows(cache / "results" / "runs.csv") if r["dataset"] == dataset]
    # one row per method at its threshold, plus the full-depth reference of the methods that exit
    assert {r["method"] for r in rows} == set(METHODS.names())
    for row in rows:
        assert row["standin"] and "not" in row["standin"]  # labelled as a stand-in
        assert row["encoders_random_init"] in ("True", "true", "1")
        assert row["condition"] == ("class" if dataset == "imagenet256" else "text")
        assert row["passes_per_call"] == "2" and row["guidance_exit"] == "both"  # guided, one exit per pair
        assert float(row["gflops"]) > 0 and 0 < float(row["layer_ratio"]) <= 1
    static = next(r for r in rows if r["method"] == "static" and r["threshold"] == "6.0")  # thresholds are stored as floats, as bench eval stores them
    assert float(static["layer_ratio"]) < 1  # exits happen on latents with guidance


def test_guided_sampling_is_batch_independent(cache):
    """A sample's label or caption and noise depend on its index only, with guidance and early exit."""
    from pathlib import Path

    from PIL import Image
    import numpy as np

    grids = []
    for batch in (1, 3):
        _run(cache, "imagenet256", "static", "--set", "sample.threshold=6", "--set", f"sample.batch_size={batch}",
             "--set", "run.experiment=batch" + str(batch))
        row = [r for r in read_rows(cache / "results" / "runs.csv")
               if r["experiment"] == f"batch{batch}" and r["threshold"] == "6.0"][0]
        grids.append(np.asarray(Image.open(Path(row["grid"]))).astype(float))
    assert np.abs(grids[0] - grids[1]).max() <= 2  # 8-bit PNGs of the same images
