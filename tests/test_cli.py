"""The `bench` command line through typer's CliRunner (bench/cli.py)."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.store import read_rows

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _tiny_run_args(tmp_path):
    return ["run", "--quiet", "--samples", "4", "--steps", "3", "--results", str(tmp_path / "results"),
            "--set", "model.init_from=null", "--set", "eval.fid=false", "--set", "train.steps=2",
            "--set", "model.kwargs={embed_dim: 32, num_heads: 2}", "--set", "data.limit=64",
            "--set", "train.batch_size=16", "--set", f"run.runs_dir={tmp_path / 'runs'}"]


def test_ls_lists_everything():
    result, out = _invoke("ls")
    assert result.exit_code == 0, out
    for header in ("methods:", "backbones:", "datasets:", "samplers:", "profiles:"):
        assert header in out
    for name in ("baseline", "uvit_tiny", "uvit_s2_cifar10", "ddim_cifar10", "mnist", "cifar10", "celeba",
                 "dpm_solver", "euler_maruyama", "ddim", "tiny", "small", "paper"):
        assert name in out
    result, out = _invoke("ls", "backbones")
    assert result.exit_code == 0 and "backbones:" in out and "methods:" not in out and "uvit_tiny" in out
    result, out = _invoke("ls", "bogus")
    assert result.exit_code == 2 and "bogus" in out and "Traceback" not in out


def test_run_stores_one_row_and_a_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository
    repo_results = sorted(p.name for p in (REPO / "results").iterdir()) if (REPO / "results").exists() else []
    result, out = _invoke(*_tiny_run_args(tmp_path))
    assert result.exit_code == 0, out + repr(result.exception)
    csv_path = tmp_path / "results" / "runs.csv"
    rows = read_rows(csv_path)
    assert len(rows) == 1
    row = rows[0]
    assert float(row["layer_ratio"]) == 1.0
    assert (row["method"], row["backbone"], row["dataset"], row["profile"]) == ("baseline", "uvit_tiny", "mnist", "tiny")
    assert (row["steps"], row["n_samples"], row["sampler"]) == ("3", "4", "dpm_solver")
    assert row["train_steps"] == "2" and row["data_limit"] == "64" and row["mode"] == "realised"
    assert row["scale"] == "cpu-tiny" and row["dataset_checksum"] and row["config_hash"]
    assert float(row["gflops"]) > 0 and float(row["seconds_per_image"]) > 0
    grid = Path(row["grid"])
    assert grid.exists() and grid.parent == tmp_path / "results" / "grids"
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(grid) as img:
        assert img.size == (2 * 28 + 3 * 2, 2 * 28 + 3 * 2)  # 4 samples: a 2 x 2 grid, padding 2
    checkpoint = Path(row["checkpoint"])
    assert checkpoint.name == "final.pt" and (tmp_path / "runs") in checkpoint.parents
    assert "stored in" in out

    # the same cell again: reuses the checkpoint, adds no row
    mtime = checkpoint.stat().st_mtime_ns
    result, out = _invoke(*_tiny_run_args(tmp_path))
    assert result.exit_code == 0, out
    assert "already stored" in out
    assert len(read_rows(csv_path)) == 1
    assert checkpoint.stat().st_mtime_ns == mtime
    assert not list(tmp_path.rglob("*.tmp"))
    after = sorted(p.name for p in (REPO / "results").iterdir()) if (REPO / "results").exists() else []
    assert after == repo_results
    assert not (tmp_path / "runs.csv").exists() and not (tmp_path / "results" / "results").exists()


@pytest.mark.parametrize("args,expected", [
    (["run", "--dataset", "mnst"], "Did you mean 'mnist'"),
    (["run", "--profile", "tinny"], "Did you mean 'tiny'"),
    (["run", "--set", "train.lrr=1"], "train.lrr"),
    (["run", "--set", "train.lr=abc"], "train.lr"),
    (["train", "--method", "baselin"], "Did you mean 'baseline'"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    result, out = _invoke(*args, "--set", f"run.runs_dir={tmp_path / 'runs'}")
    assert result.exit_code == 2, out
    assert expected in out
    assert "error:" in out and "Traceback" not in out
    assert isinstance(result.exception, SystemExit)
    assert not (tmp_path / "runs").exists()  # failed before anything ran


def test_config_prints_the_resolved_config_and_writes_nothing(tmp_path, monkeypatch):
    import json

    import yaml

    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench.yaml").write_text((REPO / "bench.yaml").read_text())
    result, out = _invoke("config", "--method", "static", "--set", "train.lr=1e-3", "--section", "train")
    assert result.exit_code == 0, out
    body, note = out.rsplit("# config hash ", 1)
    assert yaml.safe_load(body) == {"train": yaml.safe_load(body)["train"]} and yaml.safe_load(body)["train"]["lr"] == 1e-3
    assert "(the deediff run's weights): not trained yet" in note  # static reads DeeDiff's checkpoint
    result, out = _invoke("config", "--json", "--section", "run")
    assert result.exit_code == 0 and json.loads(result.stdout)["run"]["method"] == "baseline"
    result, out = _invoke("config", "--section", "nonsense")
    assert result.exit_code == 2 and "valid: run, data" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml"]  # no runs/, no results/, no cache
