"""The `paper` profile's code path, end to end on the CPU with its sizes shrunk by --set, so that a GPU
user's first paper run does not fail on a path nobody executed: DeeDiff fine-tuned from an official
U-ViT checkpoint (the bare `nnet` state dict U-ViT releases), Euler-Maruyama with many steps, FID
against the dataset's reference statistics, and the paper's threshold grid.

Shrunk: the width (32 instead of 512; still U-ViT-S/2's 13 blocks, patch 2), 2 training steps,
8 samples at 100 Euler-Maruyama steps, reference statistics of 32 training images.
"""
import csv

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.config import load_config, resolve
from bench.setup import build_model
from methods import build_method

SHRINK = {"model.kwargs": "{embed_dim: 32, num_heads: 2}", "train.steps": 2, "train.warmup_steps": 1,
          "train.batch_size": 8, "train.log_every": 1, "train.progress": "false", "sample.batch_size": 8,
          "eval.reference_limit": 32, "eval.fid_batch_size": 16, "data.limit": 64}


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + (repr(result.exception) if result.exception else "")
    return result.output


@pytest.fixture()
def official_checkpoint(tmp_path):
    """What U-ViT releases (cifar10_uvit_small.pth): the backbone's state dict and nothing else."""
    cfg = resolve(load_config(), run={"profile": "paper", "dataset": "mnist", "method": "baseline"},
                  overrides=[f"model.kwargs={SHRINK['model.kwargs']}"])
    torch.manual_seed(7)
    backbone = build_model(cfg, build_method("baseline", cfg["method"])).backbone
    path = tmp_path / "mnist_uvit_small.pth"
    torch.save(backbone.state_dict(), path)
    return path, backbone.state_dict()


def test_paper_profile_end_to_end(tmp_path, monkeypatch, official_checkpoint):
    monkeypatch.setenv("BENCH_CACHE", str(tmp_path / "cache"))
    path, official = official_checkpoint
    sets = {**SHRINK, "model.init_from": path, "run.runs_dir": tmp_path / "runs"}
    common = ["--profile", "paper", "--dataset", "mnist", "--method", "deediff"] + \
        [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    checkpoint = cli("train", *common, "--quiet").strip().splitlines()[-1]
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert state["config"]["run"]["profile"] == "paper"
    # the official weights were the start: two steps at lr 2e-4 (warm-up) leave them close, much closer
    # than another initialisation of the same backbone is
    start, trained = official["patch_embed.proj.weight"], state["model"]["backbone.patch_embed.proj.weight"]
    cfg = resolve(load_config(), run={"profile": "paper", "dataset": "mnist", "method": "deediff"},
                  overrides=[f"model.kwargs={SHRINK['model.kwargs']}"])
    torch.manual_seed(8)
    other = build_model(cfg, build_method("deediff", cfg["method"])).backbone.state_dict()["patch_embed.proj.weight"]
    assert (trained - start).abs().max() < 1e-2 < (other - start).abs().max()

    paper_grid = build_method("deediff", cfg["method"]).default_thresholds  # the paper's sweep, 0.2 to 0.01
    assert len(paper_grid) == 8 and max(paper_grid) == 0.2 and min(paper_grid) == 0.01
    cli("eval", *common, "--results", tmp_path / "results", "--samples", 8, "--steps", 100, "--quiet",
        "--thresholds", "full," + ",".join(map(str, paper_grid)))
    with open(tmp_path / "results" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["threshold"] for r in rows] == [""] + [str(t) for t in paper_grid]
    for row in rows:
        assert row["profile"] == "paper" and row["sampler"] == "euler_maruyama" and row["steps"] == "100"
        assert row["init_from"].endswith("mnist_uvit_small.pth")
        assert float(row["fid"]) > 0 and row["fid_n_reference"] == "32" and row["fid_reference"].startswith("train")
        assert 0 < float(row["layer_ratio"]) <= 1
