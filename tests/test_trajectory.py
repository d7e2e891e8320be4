"""Per-call exit histograms, trajectory error against full depth and per-layer errors, from a real tiny run."""
import csv

import pytest
from typer.testing import CliRunner

from bench.cli import app


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trajectory")
    common = ["--method", "deediff", "--quiet", "--samples", "3", "--steps", "4", "--results", str(tmp / "res"),
              "--set", f"run.runs_dir={tmp / 'runs'}", "--set", "model.init_from=null", "--set", "eval.fid=false", "--set", "train.steps=1",
              "--set", "train.batch_size=4", "--set", "data.limit=16", "--set", "sample.grid=false",
              "--set", "model.kwargs={embed_dim: 32, num_heads: 2}", "--set", "sample.options={order: 1}"]
    assert CliRunner().invoke(app, ["run", *common]).exit_code == 0  # trains, and stores the full-depth row
    result = CliRunner().invoke(app, ["eval", *common, "--thresholds", "full,0.9,0.0"])
    assert result.exit_code == 0, result.output
    return tmp / "res"


def test_per_call_histograms_match_the_work(evaluated):
    runs = {r["threshold"] or "full": r for r in _rows(evaluated / "runs.csv")}
    per_call = _rows(evaluated / "per_call.csv")
    for threshold, row in runs.items():
        calls = [c for c in per_call if c["run_id"] == row["run_id"]]
        assert len(calls) == 4  # DPM-Solver order 1, 4 steps: one network call each
        for c in calls:
            assert sum(int(c[f"exits_block_{i}"]) for i in range(13)) == 3  # every sample exits once
        mean_ratio = sum(float(c["layer_ratio"]) for c in calls) / len(calls)
        assert mean_ratio == pytest.approx(float(row["layer_ratio"]), abs=1e-5)
    assert float(runs["full"]["layer_ratio"]) == 1.0 and float(runs["0.0"]["layer_ratio"]) == 1.0


def test_trajectory_error_is_zero_for_full_depth_only(evaluated):
    runs = {r["threshold"] or "full": r["run_id"] for r in _rows(evaluated / "runs.csv")}
    trajectory = _rows(evaluated / "trajectory.csv")
    full = [float(t["mse_vs_full"]) for t in trajectory if t["run_id"] == runs["full"]]
    early = [float(t["mse_vs_full"]) for t in trajectory if t["run_id"] == runs["0.9"]]
    assert len(full) == len(early) == 4 and all(v == 0.0 for v in full)
    assert early[-1] > 0  # at 0.9 (uncertainty of an untrained UEM is about 0.5) samples exit early


def test_layer_errors_along_the_full_trajectory(evaluated):
    rows = _rows(evaluated / "layer_mse.csv")
    assert len(rows) == 4
    for row in rows:
        assert float(row["mse_exit_12"]) == 0.0  # the last exit is the final prediction
        assert all(float(row[f"mse_exit_{i}"]) >= 0 for i in range(12))


def test_loss_per_timestep_and_uncertainty_maps(evaluated):
    import numpy as np

    rows = _rows(evaluated / "loss_per_timestep.csv")
    assert [int(r["bucket"]) for r in rows] == list(range(10))
    assert all(float(r["mse_exit_12"]) > 0 for r in rows)
    (snapshot,) = list((evaluated / "uncertainty").glob("*.npz"))
    maps = np.load(snapshot)["maps"]
    assert maps.shape[1:] == (3, 13, 1, 28, 28)  # calls x samples x exits x C x H x W
    assert ((maps >= 0) & (maps <= 1)).all()  # sigmoid outputs
