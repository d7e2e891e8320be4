"""The fine-tuning recipe (issue 11): EMA that starts from the initial weights, warm-up, the exit modules'
learning rate, DeeDiff's loss weights, and static exits evaluated on the DeeDiff checkpoint (Table 5).

A narrow uvit_tiny (width 32, 2 heads, still 13 blocks) on 256 embedded MNIST digits, a few steps.
"""
import pytest
import torch
from torch import nn

from bench.checkpoint import checkpoint_dir, load_checkpoint
from bench.config import ConfigError, load_config, resolve
from bench.setup import build_model
from bench.train import parameter_groups, ramped_parameters, train, update_ema, weights_config
from methods import build_method
from methods.common import exit_predictions
from backbones import build_backbone
from bench.diffusion import SCHEDULES
from methods.base import DiffusionModel

NARROW = {"model.kwargs": {"embed_dim": 32, "num_heads": 2}, "data.limit": 256, "train.batch_size": 16,
          "train.log_every": 1, "train.progress": False}


def make_cfg(tmp_path, method="baseline", **overrides):
    base = {**NARROW, "model.init_from": None, "train.steps": 2, "run.runs_dir": str(tmp_path / "runs"),
            "run.results": str(tmp_path / "results")}
    base.update(overrides)
    return resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": method}, overrides=base)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A narrow baseline trained for 2 steps: the 'pre-trained U-ViT' the fine-tunes below start from."""
    root = tmp_path_factory.mktemp("recipe")
    return train(make_cfg(root, "baseline"))


# ---- EMA ----------------------------------------------------------------------------------------------


def test_update_ema_ramps_only_the_named_parameters():
    model, ema = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        for p in ema.parameters():
            p.fill_(0.0)
    update_ema(ema, model, decay=0.99, step=0, ramped={"bias"})
    # step 0: ramped decay min(0.99, 1/10) = 0.1 -> 0.9 of the way; constant decay 0.99 -> 0.01 of the way
    assert torch.allclose(ema.bias, torch.full((2,), 0.9))
    assert torch.allclose(ema.weight, torch.full((2, 2), 0.01))


def test_ramped_parameters_rules():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    names = {n for n, _ in model.named_parameters()}
    loaded = {"0.weight", "0.bias"}
    assert ramped_parameters(model, loaded, "fresh") == {"1.weight", "1.bias"}
    assert ramped_parameters(model, set(), "fresh") == names  # from scratch: everything is fresh
    assert ramped_parameters(model, loaded, "all") == names
    assert ramped_parameters(model, loaded, "none") == set()


def _distance(a: dict, b: dict, prefix: str) -> float:
    return sum(float((a[k].float() - b[k].float()).pow(2).sum()) for k in a if k.startswith(prefix)) ** 0.5


@pytest.mark.parametrize("rule", ["fresh", "all"])
def test_fine_tune_ema_stays_near_the_pretrained_weights(pretrained, tmp_path, rule):
    """With ema_ramp=fresh the backbone's EMA starts at the pretrained weights and moves at the constant
    decay (here 0.999: about 0.3% of the way in 3 steps), while the new UEMs follow the ramp; with the
    old rule (all) the backbone's EMA is about the last iterate after 3 steps."""
    cfg = make_cfg(tmp_path, "deediff", **{"model.init_from": str(pretrained), "train.steps": 3,
                                           "train.ema_decay": 0.999, "train.ema_ramp": rule, "train.lr": 1e-2,
                                           "train.exit_calibration_steps": 0})
    state = load_checkpoint(train(cfg))
    init = {f"backbone.{k}" if not k.startswith("backbone.") else k: v
            for k, v in load_checkpoint(pretrained)["ema"].items()}
    init = {k: v for k, v in init.items() if k.startswith("backbone.")}
    moved = _distance(state["model"], init, "backbone.")
    ema_moved = _distance({k: state["ema"][k] for k in init}, init, "backbone.")
    assert moved > 0
    if rule == "fresh":
        assert ema_moved < 0.01 * moved
        # the UEMs were not in the pretrained file: their EMA follows the ramp, close to the trained modules
        uem = [k for k in state["model"] if k.startswith("extras.uem")]
        assert uem and _distance({k: state["ema"][k] for k in uem}, state["model"], "extras.") < \
            0.5 * _distance({k: state["ema"][k] for k in uem}, {k: torch.zeros_like(state["ema"][k]) for k in uem},
                            "extras.")
    else:
        assert ema_moved > 0.5 * moved


def test_bad_recipe_values_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ema_ramp"):
        make_cfg(tmp_path, **{"train.ema_ramp": "sometimes"})
    with pytest.raises(ConfigError, match="extras_lr_mult"):
        make_cfg(tmp_path, **{"train.extras_lr_mult": 0.0})


# ---- warm-up and the exit modules' learning rate ------------------------------------------------------


def test_extras_get_their_learning_rate_multiplier_through_warm_up(pretrained, tmp_path):
    cfg = make_cfg(tmp_path, "deediff", **{"model.init_from": str(pretrained), "train.steps": 1, "train.lr": 1e-3,
                                           "train.warmup_steps": 4, "train.extras_lr_mult": 10.0,
                                           "train.ckpt_every": 1})
    model = build_model(cfg, build_method("deediff", cfg["method"]))
    groups = parameter_groups(model, cfg["train"])
    extras = {id(p) for _, m in model.extras.items() for p in m.parameters()}
    for g in groups:
        assert all((id(p) in extras) == (g["lr_mult"] == 10.0) for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    # one step of a 4-step warm-up: lr x 1/4 for the backbone, x 10/4 for the UEMs (as saved with the state)
    from bench.train import learning_rate

    assert learning_rate(cfg["train"], 0) == pytest.approx(1e-3 / 4)
    last = train(cfg, stop_at=1)
    saved = load_checkpoint(last)["optimizer"]["param_groups"]
    assert sorted({round(g["lr"], 12) for g in saved}) == [pytest.approx(2.5e-4), pytest.approx(2.5e-3)]


def test_the_tiny_fine_tune_warms_up():
    cfg = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "deediff"})
    assert cfg["model"]["init_from"] and cfg["train"]["warmup_steps"] > 0
    assert cfg["train"]["ema_ramp"] == "fresh"


# ---- DeeDiff's loss weights ---------------------------------------------------------------------------


def _deediff_terms(hparams):
    method = build_method("deediff", hparams)
    torch.manual_seed(3)
    backbone = build_backbone("uvit_tiny", embed_dim=32, num_heads=2)
    model, schedule = DiffusionModel(backbone, method.attach(backbone)), SCHEDULES.get("vp")()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 28, 28, generator=gen) * 2 - 1
    t = schedule.sample_train_time(4, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t, model_t = schedule.add_noise(x0, t, noise), schedule.model_time(t)
    _, logs = method.loss(model, x_t, model_t, noise)
    with torch.no_grad():
        mse = [float((g - noise).pow(2).mean()) for g in exit_predictions(model, x_t, model_t).preds]
    return logs, mse


def test_official_layerwise_loss_is_a_weighted_mean_and_the_paper_form_a_sum():
    logs, mse = _deediff_terms({"loss_form": "official"})
    assert min(mse) - 1e-6 <= logs["l_ual"] <= max(mse) + 1e-6  # weights over the 13 exits sum to 1
    paper, mse_p = _deediff_terms({"loss_form": "paper"})
    assert paper["l_ual"] > max(mse_p[:-1])  # 12 exits summed: larger than any one of them
    assert logs["l_u"] == pytest.approx(paper["l_u"] / len(mse), rel=1e-5)


def test_deediff_default_loss_is_the_official_form():
    cfg = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "deediff"})
    assert build_method("deediff", cfg["method"]).hp["loss_form"] == "official"


# ---- static exits of the DeeDiff checkpoint (Table 5) -------------------------------------------------


def test_static_evaluates_the_deediff_checkpoint(pretrained, tmp_path):
    from bench.evaluate.measure import measure
    from bench.run import finished_checkpoint

    over = {"model.init_from": str(pretrained), "train.steps": 1, "sample.n_samples": 2, "sample.batch_size": 2,
            "sample.steps": 2, "sample.grid": False, "eval.fid": False, "eval.layer_errors": False,
            "eval.loss_buckets": 0}
    static = make_cfg(tmp_path, "static", **over)
    deediff = make_cfg(tmp_path, "deediff", **over)
    assert weights_config(static)["run"]["method"] == "deediff"
    assert checkpoint_dir(weights_config(static)) == checkpoint_dir(deediff)
    path = train(static)  # trains the DeeDiff run
    assert path.parent == checkpoint_dir(deediff) and finished_checkpoint(static) == path
    rows = measure(static, path, [4.0], progress=False)
    exit_row = [r for r in rows if r["threshold"] == 4.0][0]
    assert exit_row["layer_ratio"] == pytest.approx(5 / 13, abs=1e-6) and exit_row["method"] == "static"
    assert exit_row["checkpoint"] == str(path)
    # the separately trained variant is kept as an option
    own = make_cfg(tmp_path, "static", **over, **{"method.weights": "own"})
    assert weights_config(own) is own and checkpoint_dir(own) != checkpoint_dir(deediff)
    # Moon et al.'s time schedule trains for its own schedule by default
    timed = make_cfg(tmp_path, "static", **over, **{"method.schedule": "time"})
    assert weights_config(timed) is timed


# ---- the exit rule acts only when sampling: its variants sample the same checkpoint ---------------------


@pytest.mark.parametrize("method,key,value", [("deediff", "patience", 0), ("deediff", "exit_rule", "batch_mean"),
                                              ("deediff", "patience_reset", True), ("calm", "compare", "prediction")])
def test_an_exit_rule_variant_shares_the_checkpoint_but_not_the_cells(tmp_path, method, key, value):
    from bench.config import INFERENCE_METHOD_KEYS, config_hash, inference_options
    from bench.evaluate.measure import row_hash

    default = make_cfg(tmp_path, method)
    variant = make_cfg(tmp_path, method, **{f"method.{key}": value})
    assert inference_options(default) == {} and list(inference_options(variant)) == [key]
    assert config_hash(variant) == config_hash(default) and checkpoint_dir(variant) == checkpoint_dir(default)
    assert row_hash(default) == config_hash(default)  # the stored rows' hashes hold
    assert row_hash(variant) != row_hash(default)     # ... and the variant's cells are its own
    # the plugins' defaults and bench.yaml's are the rule the training hash holds the keys at
    from methods import calm, deediff
    plugin = {"deediff": deediff.DEFAULTS, "calm": calm.DEFAULTS}[method]
    assert all(plugin[k] == v == load_config()["methods"][method][k] for k, v in INFERENCE_METHOD_KEYS[method].items())
    trained = make_cfg(tmp_path, method, **{"method.lambda_u" if method == "deediff" else "train.lr": 0.5})
    assert config_hash(trained) != config_hash(default)  # a key that changes training still counts
    # ... which is right only because training never reads it: the same model, batch and noise give the
    # same loss under either rule
    rules = [build_method(method, c["method"]) for c in (default, variant)]
    torch.manual_seed(0)
    model = build_model(default, rules[0])
    x, t, noise = torch.randn(4, 1, 28, 28), torch.rand(4) * 999, torch.randn(4, 1, 28, 28)
    losses = [rule.loss(model, x, t, noise)[0] for rule in rules]
    assert torch.equal(losses[0], losses[1])


def test_a_setting_that_acts_as_the_default_rule_is_the_default_cell(tmp_path):
    from bench.config import inference_options

    # patience 0 exits at the first crossing: there is nothing for patience_reset to reset
    eager = make_cfg(tmp_path, "deediff", **{"method.patience": 0})
    assert inference_options(make_cfg(tmp_path, "deediff", **{"method.patience": 0, "method.patience_reset": True})) \
        == inference_options(eager) == {"patience": 0}


def test_an_exit_rule_variant_is_measured_from_the_stored_checkpoint(pretrained, tmp_path):
    import pandas as pd

    from bench.evaluate.measure import measure, skip_stored
    from bench.run import finished_checkpoint

    over = {"model.init_from": str(pretrained), "train.steps": 1, "sample.n_samples": 4, "sample.batch_size": 4,
            "sample.steps": 2, "sample.grid": False, "eval.fid": False, "eval.layer_errors": True,
            "eval.loss_buckets": 0}
    path = train(make_cfg(tmp_path, "deediff", **over))
    eager = make_cfg(tmp_path, "deediff", **over, **{"method.patience": 0})
    assert finished_checkpoint(eager) == path  # nothing to retrain
    default_rows = measure(make_cfg(tmp_path, "deediff", **over), path, [None, 0.9], progress=False)
    assert skip_stored(eager, [None, 0.9]) == [None, 0.9]  # not "already stored": cells of its own
    eager_rows = measure(eager, path, [None, 0.9], progress=False)
    assert skip_stored(eager, [None, 0.9]) == []
    # the full-depth analyses (no exit rule changes them) are the default rule's, not made again
    assert set(pd.read_csv(tmp_path / "results" / "layer_mse.csv")["run_id"]) == {default_rows[0]["run_id"]}
    assert len(eager_rows) == 2 and {r["run_id"] for r in eager_rows}.isdisjoint(r["run_id"] for r in default_rows)
    assert all(r["checkpoint"] == str(path) for r in eager_rows)
    # at threshold 0.9 (above every u of a barely trained UEM) patience 1 waits one block longer in the
    # first half than patience 0: fewer layers
    assert eager_rows[1]["layer_ratio"] < default_rows[1]["layer_ratio"]


# ---- calibration of the exit modules on the frozen EMA backbone ---------------------------------------


def test_exit_calibration_fits_the_modules_to_the_ema_backbone_and_resumes(pretrained, tmp_path):
    over = {"model.init_from": str(pretrained), "train.steps": 2, "train.exit_calibration_steps": 2,
            "train.ema_decay": 0.9, "train.ckpt_every": 1}
    straight = load_checkpoint(train(make_cfg(tmp_path / "a", "deediff", **over)))
    assert straight["step"] == 4
    for key, value in straight["ema"].items():  # the backbone is the EMA's; the modules are the calibrated ones
        assert torch.equal(value, straight["model"][key]), key
    cfg = make_cfg(tmp_path / "b", "deediff", **over)
    joint_only = load_checkpoint(train(cfg, stop_at=2))
    uem = [k for k in joint_only["model"] if k.startswith("extras.")]
    assert any(not torch.equal(joint_only["model"][k], straight["model"][k]) for k in uem)  # calibration trained them
    train(cfg, stop_at=3)  # interrupted inside the calibration, then resumed
    resumed = load_checkpoint(train(cfg))
    for key in straight["ema"]:
        assert torch.equal(resumed["ema"][key], straight["ema"][key]), key
    # a method without modules of its own has nothing to calibrate
    assert load_checkpoint(train(make_cfg(tmp_path / "c", "baseline", **over)))["step"] == 2


def test_profiles_take_per_method_layers():
    """The study profile trains `small` from scratch with the baseline's budget; the others fine-tune alike."""
    def resolved(method):
        return resolve(load_config(), run={"profile": "study", "dataset": "mnist", "method": method})

    small, deediff, baseline = resolved("small"), resolved("deediff"), resolved("baseline")
    assert small["model"]["init_from"] is None and small["train"]["steps"] * small["train"]["batch_size"] >= 2_660_000
    assert deediff["train"] == baseline["train"] and deediff["model"] == baseline["model"]
    assert deediff["model"]["init_from"] == "builtin:uvit_tiny_mnist.pt"
    # --set still wins over a per_method layer
    over = resolve(load_config(), run={"profile": "study", "dataset": "mnist", "method": "small"},
                   overrides=["train.steps=5"])
    assert over["train"]["steps"] == 5


def test_static_rows_name_the_deediff_weights_they_measure(tmp_path):
    """Static's rows carry a hash of its own config and the DeeDiff weights': other DeeDiff settings give
    other cells (not 'already stored'), and resolve_for keeps the profile layers and overrides."""
    from bench.evaluate.measure import row_hash

    a = make_cfg(tmp_path, "static", **{"sample.n_samples": 3})
    b = make_cfg(tmp_path, "static", **{"sample.n_samples": 3, "methods.deediff.lambda_u": 0.5})
    assert row_hash(a) != row_hash(b)
    source = weights_config(a)
    assert source["sample"]["n_samples"] == 3 and source["model"]["kwargs"] == NARROW["model.kwargs"]
    assert source["method"] == make_cfg(tmp_path, "deediff")["method"]


def test_ddim_exit_heads_of_a_baseline_checkpoint_count_as_fresh(tmp_path):
    """The baseline never trains the DDIM U-Net's per-exit heads: a fine-tune ramps their EMA like new modules."""
    over = {"model.kwargs": {"attn_resolutions": []}, "model.backbone": "ddim_tiny", "model.schedule": "linear",
            "train.steps": 1}
    base = train(make_cfg(tmp_path / "base", "baseline", **over))
    cfg = make_cfg(tmp_path / "ft", "deediff", **over, **{"model.init_from": str(base)})
    model = build_model(cfg, build_method("deediff", cfg["method"]))
    from bench.checkpoint import load_weights_into

    loaded = load_weights_into(model, base, drop_extras=True)
    heads = {k for k in model.state_dict() if k.startswith("backbone.exit_heads.")}
    assert heads and not heads & loaded and any(k.startswith("backbone.down") or k.startswith("backbone.conv_in")
                                                for k in loaded)
    assert heads <= ramped_parameters(model, loaded, "fresh")
