"""`bench sweep`: one real threshold sweep on a local Ray runtime, and the messages for sweep mistakes.

The real sweep trains a tiny model (one Tune trial), measures two thresholds (two trials), then runs
again and must add nothing and start no Ray at all (the results store decides, not Ray's state).
About 35-50 s on two shared cores, most of it Ray starting up; the mistakes fail before Ray starts.
"""
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.config import load_config
from bench.store import read_rows
from methods import METHODS

RAY_STARTED = re.compile(r"Ray \S+ ready in")


def _invoke(*args):
    result = CliRunner().invoke(app, list(args))
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _tiny(tmp_path):
    return ["--samples", "4", "--steps", "3", "--results", str(tmp_path / "results"),
            "--set", "model.init_from=null", "--set", "eval.fid=false", "--set", "train.steps=2",
            "--set", "model.kwargs={embed_dim: 32, num_heads: 2}", "--set", "data.limit=64",
            "--set", "train.batch_size=16", "--set", f"run.runs_dir={tmp_path / 'runs'}"]


def _method_with_exits():
    """deediff with two thresholds where it is registered and listed in bench.yaml, else baseline."""
    if "deediff" in METHODS and "deediff" in load_config()["methods"]:
        return "deediff", ["0.2", "0.1"]
    return "baseline", ["full", "0.5"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_threshold_sweep_on_local_ray_stores_one_row_per_threshold_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    method, thresholds = _method_with_exits()
    args = ["sweep", "thresholds", "--quiet", "--method", method, "--dataset", "mnist", "--profile", "tiny",
            "--thresholds", ",".join(thresholds), *_tiny(tmp_path)]
    result, out = _invoke(*args)
    assert result.exit_code == 0, out + repr(result.exception)
    assert "(trained first)" in out and "127.0.0.1 only" in out

    rows = read_rows(tmp_path / "results" / "runs.csv")
    # every asked threshold, plus the full-depth reference each evaluation measures (stored once)
    assert sorted(r["threshold"] or "full" for r in rows) == sorted({*thresholds, "full"})
    assert {r["method"] for r in rows} == {method} and {r["dataset"] for r in rows} == {"mnist"}
    assert all(r["steps"] == "3" and r["n_samples"] == "4" and r["device"] == "cpu" for r in rows)
    assert all(float(r["full_seconds_per_image"]) > 0 and float(r["measured_speedup"]) > 0 for r in rows)
    assert len({r["checkpoint"] for r in rows}) == 1
    assert Path(rows[0]["checkpoint"]).exists()
    experiments = sorted(p.name for p in (tmp_path / "runs" / "ray").iterdir())
    assert [name.split("-")[0] for name in experiments] == ["thresholds", "train"]

    # again: every cell is stored, so nothing runs and Ray does not even start
    result, out = _invoke(*args)
    assert result.exit_code == 0, out
    assert "nothing to do" in out and not RAY_STARTED.search(out)
    assert len(read_rows(tmp_path / "results" / "runs.csv")) == len({*thresholds, "full"})
    assert sorted(p.name for p in (tmp_path / "runs" / "ray").iterdir()) == experiments


@pytest.mark.parametrize("args,expected", [
    (["thresholds", "--methods", "deediff,bertxt"], "Did you mean 'bertxit'"),
    (["thresholds", "--method", "baselin"], "Did you mean 'baseline'"),
    (["thresholds", "--dataset", "mnst"], "Did you mean 'mnist'"),
    (["thresholds", "--thresholds", "0.1,abc"], "'abc' is not a number or 'full'"),
    (["thresholds", "--methods", "deediff", "--thresholds", "1.5"], "outside the range"),
    (["thresholds", "--set", "sweep.cpus_per_trial=0"], "sweep.cpus_per_trial must be > 0"),
    (["thresholds", "--method", "baseline", "--address", "127.0.0.1:1"], "could not reach the Ray cluster"),
    (["train", "--methods", "deedif"], "Did you mean 'deediff'"),
    (["train", "--datasets", "mnist,cifar1"], "Did you mean 'cifar10'"),
    (["train", "--seeds", "0,one"], "--seeds must be whole numbers"),
    (["train", "--grid", "train.lr"], "key=v1,v2"),
    (["train", "--grid", "train.lrr=1e-3,2e-4"], "train.lrr"),
    (["train", "--grid", "train.lr=1e-3,abc"], "train.lr"),
])
def test_sweep_mistakes_exit_2_with_a_message_before_ray_starts(tmp_path, monkeypatch, args, expected):
    monkeypatch.chdir(tmp_path)
    if "deediff" in args and "deediff" not in load_config()["methods"]:
        pytest.skip("deediff is not listed in bench.yaml yet")
    result, out = _invoke("sweep", *args, "--set", f"run.runs_dir={tmp_path / 'runs'}")
    assert result.exit_code == 2, out
    assert expected in out, out
    assert "error:" in out and "Traceback" not in out
    assert not RAY_STARTED.search(out)  # refused before a Ray runtime started
    assert not (tmp_path / "runs").exists()


def test_threshold_grid_comes_from_bench_yaml_and_must_be_a_list(tmp_path, monkeypatch):
    import yaml

    from bench.sweep import method_thresholds, resolve_cells
    from methods import build_method

    monkeypatch.chdir(tmp_path)
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "bench.yaml").read_text())
    cfg["methods"]["calm"] = {**(cfg["methods"].get("calm") or {}), "thresholds": [0.99, 0.9]}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    (label, resolved), = resolve_cells(str(tmp_path / "bench.yaml"), {}, [], methods=["calm"])
    assert method_thresholds(build_method("calm", resolved["method"])) == [0.99, 0.9]
    assert method_thresholds(build_method("baseline", {})) == [None]  # no exits: full depth only

    cfg["methods"]["calm"]["thresholds"] = 0.9
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(cfg))
    result, out = _invoke("sweep", "thresholds", "--config", str(tmp_path / "bench.yaml"), "--method", "calm")
    assert result.exit_code == 2 and "methods.calm.thresholds must be a list" in out and "Traceback" not in out


def test_trial_resources_never_ask_for_a_missing_gpu():
    from bench.sweep import trial_resources

    cfg = {"sweep": {"cpus_per_trial": 1, "gpus_per_trial": None, "storage": None}}
    messages = []
    assert trial_resources(cfg, {"cpus": 2, "gpus": 0}, echo=messages.append) == {"cpu": 1, "gpu": 0}
    assert trial_resources(cfg, {"cpus": 8, "gpus": 4}, echo=messages.append) == {"cpu": 1, "gpu": 1}
    cfg["sweep"]["gpus_per_trial"] = 0.5
    assert trial_resources(cfg, {"cpus": 8, "gpus": 4}, echo=messages.append) == {"cpu": 1, "gpu": 0.5}
    assert trial_resources(cfg, {"cpus": 2, "gpus": 0}, echo=messages.append) == {"cpu": 1, "gpu": 0}
    assert len(messages) == 1 and "no GPU" in messages[0]


def test_grid_values_may_hold_commas_inside_brackets():
    from bench.sweep import grid_points, parse_grid

    grid = parse_grid(["train.lr=1e-3,2e-4", "model.kwargs={embed_dim: 32, num_heads: 2},{embed_dim: 64}"])
    assert grid == {"train.lr": [1e-3, 2e-4], "model.kwargs": [{"embed_dim": 32, "num_heads": 2}, {"embed_dim": 64}]}
    assert len(grid_points(grid)) == 4 and grid_points({}) == [{}]


def test_the_private_ray_api_the_loopback_runtime_needs_is_still_there():
    """If a Ray upgrade moves these, the private runtime could listen on a routable address or lose its
    token: fail here, by name, rather than at a user's sweep."""
    from bench.ray_runtime import ray_private

    private = ray_private()
    assert isinstance(private["constants"].ENABLE_RAY_CLUSTER, bool)
    assert callable(private["config"].initialize)
    assert callable(private["token_loader"].instance().reset_cache)
