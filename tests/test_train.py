"""Training: resumable and reproducible, logs, divergence, checkpoints, EMA (bench/train.py).

A narrow uvit_tiny (width 32, 2 heads, still 13 blocks) on 256 embedded MNIST digits, 6 steps.
"""
import csv

import pytest
import torch

import bench.train as train_mod
from bench.checkpoint import load_checkpoint
from bench.config import config_hash, load_config, resolve
from bench.train import TrainingDiverged, train

STEPS = 6


def make_cfg(runs_dir, **overrides):
    base = {"model.init_from": None, "model.kwargs": {"embed_dim": 32, "num_heads": 2}, "data.limit": 256,
            "train.steps": STEPS, "train.batch_size": 16, "train.log_every": 2, "train.progress": False,
            "run.runs_dir": str(runs_dir)}
    base.update(overrides)
    return resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "baseline"},
                   overrides=base)


def read_log(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An interrupted-and-resumed run (a) and an uninterrupted one (b) of the same config."""
    root = tmp_path_factory.mktemp("train")
    out = {}
    cfg_a = make_cfg(root / "a")
    torch.manual_seed(1234)  # whatever the global RNG holds must not matter
    last = train(cfg_a, stop_at=3)
    assert last.name == "last.pt" and last.exists()
    assert not (last.parent / "final.pt").exists()
    out["last_state"] = torch.load(last, map_location="cpu", weights_only=True)
    out["log_after_stop"] = read_log(last.parent / "loss.csv")
    # a crash after logging step 5 but before its checkpoint leaves a row the resumed run writes again
    with open(last.parent / "loss.csv", "a", newline="") as f:
        csv.writer(f).writerow([5, "9.999999", "1.000e-03", "1.0"])
    out["a"] = train(cfg_a)
    out["cfg_a"] = cfg_a
    cfg_b = make_cfg(root / "b")
    torch.manual_seed(98765)
    out["b"] = train(cfg_b)
    out["cfg"] = cfg_b
    return out


def test_resume_equals_uninterrupted(runs):
    a, b = runs["a"], runs["b"]
    assert a.name == b.name == "final.pt" and a.parent != b.parent
    assert a.parent.name == b.parent.name  # same config, same run name
    assert not (a.parent / "last.pt").exists()  # the resumable state is gone once the run is final
    sa = torch.load(a, map_location="cpu", weights_only=True)
    sb = torch.load(b, map_location="cpu", weights_only=True)
    assert sa["step"] == sb["step"] == STEPS
    for part in ("model", "ema"):
        assert sa[part].keys() == sb[part].keys()
        for key in sa[part]:
            assert torch.equal(sa[part][key], sb[part][key]), f"{part}.{key} differs after resume"
    # and training moved the weights away from where the stopped run was at step 3
    mid = runs["last_state"]
    assert mid["step"] == 3
    assert not all(torch.equal(mid["model"][k], sb["model"][k]) for k in sb["model"])


def test_finished_run_is_reused(runs, monkeypatch):
    final = runs["b"]
    mtime = final.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_mod, "build_model", no_training)
    monkeypatch.setattr(train_mod, "build_train_dataset", no_training)
    assert train(runs["cfg"]) == final
    assert final.stat().st_mtime_ns == mtime


def test_loss_log(runs):
    header, rows_b = read_log(runs["b"].parent / "loss.csv")
    assert header == ["step", "loss", "lr", "images_per_s"]
    assert [int(r[0]) for r in rows_b] == [2, 4, 6]  # one row per log_every steps
    assert all(len(r) == 4 and float(r[1]) > 0 for r in rows_b)

    stop_header, stop_rows = runs["log_after_stop"]
    assert stop_header == header and [int(r[0]) for r in stop_rows] == [2, 3]  # and one where the call stopped

    header_a, rows_a = read_log(runs["a"].parent / "loss.csv")
    assert header_a == header
    steps_a = [int(r[0]) for r in rows_a]
    assert steps_a == sorted(set(steps_a)), f"duplicate or unordered rows after resume: {steps_a}"
    assert set(steps_a) - {3} == {2, 4, 6}  # the bogus row 5 written after the checkpoint is gone
    losses_a = {int(r[0]): r[1] for r in rows_a}
    assert all(losses_a[int(r[0])] == r[1] for r in rows_b)  # the same losses as the uninterrupted run


def test_checkpoint_holds_the_config(runs):
    state = load_checkpoint(runs["b"])  # weights_only=True inside
    raw = torch.load(runs["b"], map_location="cpu", weights_only=True)
    assert raw.keys() == state.keys()
    assert state["config"] == runs["cfg"]
    assert state["config_hash"] == config_hash(runs["cfg"])
    assert state["step"] == STEPS and "optimizer" not in state
    assert all(k.startswith("backbone.") for k in state["model"])
    assert "backbone.in_blocks.0.attn.qkv.weight" in state["model"]
    assert state["model"]["backbone.pos_embed"].shape[-1] == 32
    last = runs["last_state"]  # the resumable checkpoint also carries the optimizer and the config
    assert {"model", "ema", "optimizer", "step", "config", "config_hash"} <= set(last)
    assert last["config"] == runs["cfg_a"]


def test_ema(runs, tmp_path):
    state = torch.load(runs["b"], map_location="cpu", weights_only=True)
    assert not all(torch.equal(state["ema"][k], state["model"][k]) for k in state["model"])
    cfg0 = make_cfg(tmp_path, **{"train.ema_decay": 0.0, "train.steps": 2})
    state0 = torch.load(train(cfg0), map_location="cpu", weights_only=True)
    for key in state0["model"]:
        assert torch.equal(state0["ema"][key], state0["model"][key]), key


def test_nan_loss_raises(tmp_path, monkeypatch):
    from methods.baseline import Baseline

    original = Baseline.loss

    def nan_at_step_two(self, model, x_t, model_t, noise, cond=None):
        loss, logs = original(self, model, x_t, model_t, noise, cond)
        nan_at_step_two.calls += 1
        return (loss * float("nan") if nan_at_step_two.calls == 3 else loss), logs

    nan_at_step_two.calls = 0
    monkeypatch.setattr(Baseline, "loss", nan_at_step_two)
    cfg = make_cfg(tmp_path)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg)
    text = str(err.value)
    assert "nan" in text and "step 3" in text and "train.lr" in text  # the third step, counted from 1 as in loss.csv
    assert isinstance(err.value, FloatingPointError)
    assert not list(tmp_path.rglob("final.pt"))


def test_huge_learning_rate_diverges(tmp_path):
    cfg = make_cfg(tmp_path, **{"train.lr": 1e30, "train.warmup_steps": 0, "train.grad_clip": 0.0})
    with pytest.raises(TrainingDiverged, match=r"lower train\.lr"):
        train(cfg)
