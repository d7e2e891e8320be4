"""Every registered method on both backbones: trains a step, samples through the engine, runs end to end."""
import csv

import pytest
import torch
from typer.testing import CliRunner

from bench.cli import app
from bench.config import load_config, resolve
from bench.diffusion import SAMPLERS, NoiseSource
from bench.engine import EarlyExitModel
from bench.setup import build_model, build_schedule
from bench.train import learning_rate  # noqa: F401  (the trainer's module must import cleanly)
from methods import METHODS, build_method

TINY_UVIT = {"model.backbone": "uvit_tiny", "model.kwargs": {"embed_dim": 32, "num_heads": 2}}
TINY_UNET = {"model.backbone": "ddim_tiny", "model.schedule": "linear"}
# Keep slow set-up steps short: pruning's importance loop on an untrained model never meets its stop rule.
FAST = {"pruning": {"max_steps": 2, "calib_images": 4}}


def _cfg(method: str, backbone: dict, tmp_path) -> dict:
    overrides = {**backbone, "model.init_from": None, "train.steps": 1, "train.batch_size": 4, "data.limit": 16,
                 "run.runs_dir": str(tmp_path / "runs"), "run.results": str(tmp_path / "results")}
    fast = {f"method.{key}": value for key, value in FAST.get(method, {}).items()}
    return resolve(load_config(), run={"method": method, "dataset": "mnist", "profile": "tiny"},
                   overrides={**overrides, **fast})


def _method_and_model(cfg):
    torch.manual_seed(0)
    method = build_method(cfg["run"]["method"], cfg["method"])
    model = build_model(cfg, method)
    if method.prepare_images:  # methods that change the backbone before training (pruning)
        schedule = build_schedule(cfg)
        x0 = torch.rand(4, 1, 28, 28) * 2 - 1
        method.prepare(model, [x0], schedule)
    return method, model


@pytest.mark.parametrize("backbone", [TINY_UVIT, TINY_UNET], ids=["uvit", "unet"])
@pytest.mark.parametrize("name", METHODS.names())
def test_one_training_step_and_sampling(name, backbone, tmp_path):
    cfg = _cfg(name, backbone, tmp_path)
    method, model = _method_and_model(cfg)
    schedule = build_schedule(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    t = schedule.sample_train_time(4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss, logs = method.loss(model, schedule.add_noise(x0, t, noise), schedule.model_time(t), noise, None)
    assert torch.isfinite(loss) and all(v == v for v in logs.values() if isinstance(v, float))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before), "a training step changed nothing"
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())

    model.eval()
    thresholds = [None, *list(method.default_thresholds)[:1]]
    for threshold in thresholds:
        engine = EarlyExitModel(model, method, threshold=threshold)
        x = SAMPLERS.get("dpm_solver")(engine, schedule, NoiseSource(0, range(3)), (1, 28, 28), 3, order=1)
        assert x.shape == (3, 1, 28, 28) and torch.isfinite(x).all()
        assert 0 < engine.record.layer_ratio(model.backbone.num_exits) <= 1


@pytest.mark.parametrize("name", METHODS.names())
def test_bench_run_every_method_on_the_tiny_profile(name, tmp_path):
    args = ["run", "--method", name, "--quiet", "--samples", "2", "--steps", "2", "--results", str(tmp_path / "res"),
            "--set", f"run.runs_dir={tmp_path / 'runs'}", "--set", "model.init_from=null", "--set", "eval.fid=false", "--set", "train.steps=1",
            "--set", "train.batch_size=4", "--set", "data.limit=16", "--set", "sample.grid=false",
            "--set", "model.kwargs={embed_dim: 32, num_heads: 2}",
            *[arg for key, value in FAST.get(name, {}).items() for arg in ("--set", f"method.{key}={value}")]]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(tmp_path / "res" / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # a method with a default threshold (the tiny profile's DeeDiff) also stores its full-depth reference row
    default = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": name})["method"].get("threshold")
    assert [r["threshold"] for r in rows] == ([""] if default is None else ["", str(default)])
    assert all(r["method"] == name for r in rows)
    assert all(0 < float(r["layer_ratio"]) <= 1 for r in rows)


def test_registry_holds_only_method_subclasses_whose_hooks_have_defaults():
    from bench.registry import Registry
    from methods.base import Method

    registry = Registry("method", base=Method)
    with pytest.raises(TypeError, match=r"must be a subclass of methods\.base\.Method"):
        registry.register("loose")(type("Loose", (), {}))

    class Bare(Method):
        """A plugin that declares nothing beyond the base."""

    registry.register("bare")(Bare)
    bare = registry.get("bare")()
    assert bare.threshold is None and not bare.from_scratch and bare.prepare_images == 0 and not bare.range_pending
    assert bare.uncertainty_maps(None, None, None) is None and bare.decide_gmacs(None) is None
    assert bare.prepare(None, None, None) is None


@pytest.mark.parametrize("name", METHODS.names())
def test_the_diffusion_schedule_training_sets_is_no_plugin_setting(name, tmp_path):
    """Training sets `method.diffusion_schedule` on every method: no plugin may use that name for anything
    of its own (static's `schedule` hyper-parameter, fixed or time, must survive it)."""
    cfg = _cfg(name, TINY_UVIT, tmp_path)
    method = build_method(name, cfg["method"])
    assert method.diffusion_schedule is None  # the base's, untouched by the plugin
    settings = dict(vars(method))
    method.diffusion_schedule = build_schedule(cfg)
    assert {k: v for k, v in vars(method).items() if k != "diffusion_schedule"} == settings
    if name == "static":
        assert method.schedule == "fixed" and method.range_pending
