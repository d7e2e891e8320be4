"""Data-parallel training on Ray Train (bench/distributed.py): two CPU workers (gloo) at half the batch
each give the weights of one process at the full batch, a killed two-worker run resumes, and a sweep
trial runs its two workers.

A narrow uvit_tiny (width 32, 2 heads, still 13 blocks) on 256 embedded MNIST digits, a few steps.
"""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.checkpoint import load_checkpoint
from bench.config import ConfigError, config_hash, load_config, resolve
from bench.distributed import World
from bench.train import train


def make_cfg(runs_dir, method="baseline", **overrides):
    base = {"model.init_from": None, "model.kwargs": {"embed_dim": 32, "num_heads": 2}, "data.limit": 256,
            "train.steps": 4, "train.batch_size": 16, "train.log_every": 1, "train.ckpt_every": 2,
            "train.progress": False, "run.runs_dir": str(runs_dir)}
    base.update(overrides)
    return resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": method}, overrides=base)


def read_log(path):
    with open(path, newline="") as f:
        return [row for row in csv.reader(f)][1:]


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            torch.testing.assert_close(a[part][key], b[part][key], rtol=1e-5, atol=1e-7, msg=f"{part}.{key}")


@pytest.fixture(scope="module")
def ray_local():
    """One private Ray runtime for the in-process runs of this module (its start costs seconds)."""
    from bench.ray_runtime import ray_runtime

    with ray_runtime(None, echo=lambda line: None) as cluster:
        if cluster["cpus"] < 2:
            pytest.skip("two Ray workers need two CPUs")
        yield cluster


def test_two_workers_give_the_weights_of_one(tmp_path, ray_local):
    # BERxiT: an exit module with its own loss and, in the calibration steps, a frozen backbone whose
    # parameters get no gradient, so that the all-reduce's handling of missing gradients is exercised.
    # (Not DeeDiff: its official loss weights the exits by the batch-mean confidence, which each worker
    # computes over its own share, as the official multi-GPU code does; see bench/distributed.py.)
    over = {"train.exit_calibration_steps": 2}
    one_cfg = make_cfg(tmp_path / "one", "bertxit", **over)
    two_cfg = make_cfg(tmp_path / "two", "bertxit", **over, **{"train.num_workers": 2})
    # N > 1 workers are a run of their own (dropout masks and batch statistics are per worker); 1 is as before
    assert config_hash(one_cfg) != config_hash(two_cfg)
    assert config_hash(one_cfg) == config_hash(make_cfg(tmp_path, "bertxit", **over, **{"train.num_workers": 1}))
    one, two = train(one_cfg), train(two_cfg)
    assert one.name == two.name == "final.pt"
    a, b = load_checkpoint(one), load_checkpoint(two)
    assert a["step"] == b["step"] == 6 and a["workers"] == 1 and b["workers"] == 2
    assert_same_weights(a, b)
    log_one, log_two = read_log(one.parent / "loss.csv"), read_log(two.parent / "loss.csv")
    assert [r[0] for r in log_one] == [r[0] for r in log_two] == [str(s) for s in range(1, 7)]
    for r1, r2 in zip(log_one, log_two):  # rank 0 logs the whole batch's loss, not its half's
        assert float(r1[1]) == pytest.approx(float(r2[1]), rel=1e-4)
    assert not list(two.parent.glob("*.tmp"))


def test_killed_two_worker_run_resumes(tmp_path, ray_local):
    steps = 60
    over = {"train.steps": steps, "train.ckpt_every": 3}
    killed_cfg = make_cfg(tmp_path / "killed", **over, **{"train.num_workers": 2})
    run_dir = tmp_path / "killed" / f"baseline-mnist-tiny-{config_hash(killed_cfg)}"
    sets = [f"{key}={value}" for key, value in {**over, "train.num_workers": 2, "model.init_from": "null",
                                                   "model.kwargs": "{embed_dim: 32, num_heads: 2}",
                                                   "data.limit": 256, "train.batch_size": 16, "train.log_every": 1,
                                                   "run.runs_dir": tmp_path / "killed"}.items()]
    cmd = [sys.executable, "-c", "from bench.cli import app; app()", "train", "--profile", "tiny", "--dataset",
           "mnist", "--method", "baseline", "--quiet"] + [arg for s in sets for arg in ("--set", s)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while not (run_dir / "last.pt").exists():
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint after 240 s"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray runtime and the workers, mid-run
        proc.wait()
    assert not (run_dir / "final.pt").exists(), "the run ended before it could be killed; make it longer"
    stopped_at = load_checkpoint(run_dir / "last.pt")["step"]
    assert 0 < stopped_at < steps

    resumed = train(killed_cfg)  # the lock died with the process; the run goes on from last.pt
    assert resumed == run_dir / "final.pt"
    whole = train(make_cfg(tmp_path / "whole", **over))  # one process, never interrupted
    assert_same_weights(load_checkpoint(resumed), load_checkpoint(whole))
    assert [r[0] for r in read_log(run_dir / "loss.csv")] == [str(s) for s in range(1, steps + 1)]


def test_sweep_trial_runs_two_workers(tmp_path, ray_local):
    from bench.sweep import sweep_train

    overrides = [f"run.runs_dir={tmp_path}", "model.init_from=null", "model.kwargs={embed_dim: 32, num_heads: 2}",
                 "data.limit=256", "train.steps=2", "train.batch_size=16", "train.num_workers=2",
                 f"sweep.storage={tmp_path / 'ray'}"]
    lines = []
    done = sweep_train(run={"profile": "tiny", "dataset": "mnist", "method": "baseline"}, overrides=overrides,
                       quiet=True, echo=lines.append)
    (metrics,) = done.values()
    assert metrics["finished"] == 1
    final = load_checkpoint(metrics["checkpoint"])
    assert final["step"] == 2 and final["workers"] == 2  # written by rank 0 of the trial's two workers
    assert any("2 Ray Train workers each" in line for line in lines)


def test_batch_must_split_over_the_workers(tmp_path):
    with pytest.raises(ConfigError, match="train.num_workers=3"):
        make_cfg(tmp_path, **{"train.num_workers": 3})
    with pytest.raises(ConfigError, match="train.num_workers"):
        make_cfg(tmp_path, **{"train.num_workers": 0})


def _average_on_two_ranks(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = torch.nn.ModuleDict({"both": torch.nn.Linear(2, 1, bias=False), "one": torch.nn.Linear(2, 1, bias=False),
                                 "none": torch.nn.Linear(2, 1, bias=False)})
    x = torch.tensor([[1.0, 2.0]]) * (rank + 1)
    loss = model["both"](x).sum() + (model["one"](x).sum() if rank == 0 else 0)  # "none" gets no gradient
    loss.backward()
    World(rank, 2).average_gradients(model)
    grads = {name: None if m.weight.grad is None else m.weight.grad.tolist() for name, m in model.items()}
    torch.save(grads, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gradients_average_over_ranks_and_missing_ones_count_as_zero(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_average_on_two_ranks, args=(str(tmp_path / "store"), str(tmp_path / "grads")), nprocs=2)
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads.{rank}", weights_only=True)
        assert grads["both"] == [[1.5, 3.0]]  # (x_0 + x_1) / 2 with x_r = (r + 1) * [1, 2]
        assert grads["one"] == [[0.5, 1.0]]   # only rank 0's, averaged with rank 1's zero
        assert grads["none"] is None          # no rank had one: AdamW skips it, as in one process


def test_one_process_world_changes_nothing():
    world = World()
    assert world.share(64) == (0, 64) and world.is_main
    model = torch.nn.Linear(3, 2)
    model(torch.randn(4, 3)).sum().backward()
    before = [p.grad.clone() for p in model.parameters()]
    world.average_gradients(model)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.parameters()))
    assert World(1, 4).share(64) == (16, 32)
