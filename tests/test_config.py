"""The configuration: defaults, bench.yaml, profiles, overrides, errors, hashes (bench/config.py)."""
import copy
from pathlib import Path

import pytest
import yaml

from bench.config import (ConfigError, config_hash, load_config, load_defaults, parse_override, resolve,
                          set_key)

REPO_YAML = Path(__file__).resolve().parents[1] / "bench.yaml"


@pytest.fixture(scope="module")
def cfg():
    return load_config(REPO_YAML)


def _yaml_with(tmp_path, **sections):
    """The project's bench.yaml plus extra top-level sections, written under tmp_path."""
    data = yaml.safe_load(REPO_YAML.read_text())
    data.update(sections)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_bench_yaml_load(cfg):
    defaults = load_defaults()
    for section in ("run", "data", "model", "train", "sample", "method", "datasets", "profiles", "methods"):
        assert section in defaults
    assert defaults["datasets"] == {} and defaults["profiles"] == {}
    assert set(cfg["datasets"]) >= {"mnist", "cifar10", "celeba"}
    assert set(cfg["profiles"]) >= {"tiny", "small", "paper"}
    assert "baseline" in cfg["methods"]
    assert cfg["run"]["config_file"] == str(REPO_YAML)
    assert load_config()["profiles"].keys() == cfg["profiles"].keys()  # found without a path too


@pytest.mark.parametrize("profile,dataset,backbone", [
    ("tiny", "mnist", "uvit_tiny"), ("tiny", "cifar10", "uvit_tiny"), ("tiny", "celeba", "uvit_tiny"),
    ("small", "mnist", "uvit_tiny"), ("small", "cifar10", "uvit_tiny"), ("small", "celeba", "uvit_tiny"),
    ("paper", "mnist", "uvit_s2_cifar10"), ("paper", "cifar10", "uvit_s2_cifar10"),
    ("paper", "celeba", "uvit_s4_celeba64"),
])
def test_profile_and_dataset_give_the_backbone(cfg, profile, dataset, backbone):
    r = resolve(cfg, run={"profile": profile, "dataset": dataset})
    assert r["model"]["backbone"] == backbone
    assert r["data"]["name"] == dataset
    assert r["data"]["resolution"] == {"mnist": 28, "cifar10": 32, "celeba": 64}[dataset]
    assert r["run"]["profile"] == profile and r["run"]["dataset"] == dataset
    assert r["method"] == {}  # baseline has no hyper-parameters


def test_profile_details(cfg):
    paper_celeba = resolve(cfg, run={"profile": "paper", "dataset": "celeba"})
    assert paper_celeba["train"]["betas"] == [0.99, 0.99] and paper_celeba["train"]["warmup_steps"] == 5000
    paper_cifar = resolve(cfg, run={"profile": "paper", "dataset": "cifar10"})
    assert paper_cifar["train"]["betas"] == [0.99, 0.999] and paper_cifar["train"]["warmup_steps"] == 2500
    assert paper_cifar["sample"]["sampler"] == "euler_maruyama" and paper_cifar["sample"]["steps"] == 1000
    assert paper_cifar["data"]["flip"] is True
    tiny_celeba = resolve(cfg, run={"profile": "tiny", "dataset": "celeba"})
    assert tiny_celeba["model"]["kwargs"] == {"patch_size": 4}
    assert resolve(cfg, run={"profile": "tiny", "dataset": "cifar10"})["model"]["kwargs"] == {}


def test_override_order(tmp_path):
    # bench.yaml beats the defaults, the profile beats bench.yaml, --set beats the profile, the sweep beats --set
    base = load_config(_yaml_with(tmp_path, train={"lr": 3.0e-4, "precision": "fp32"}, sample={"steps": 7}))
    assert base["train"]["precision"] == "fp32" and base["train"]["lr"] == 3.0e-4
    r = resolve(base, run={"profile": "tiny", "dataset": "cifar10"})
    assert r["train"]["precision"] == "fp32"  # the profile does not set it: bench.yaml's value stays
    # the per_dataset layer beats the profile: mnist fine-tunes the built-in checkpoint at a lower lr
    assert resolve(base, run={"profile": "tiny", "dataset": "mnist"})["train"]["lr"] == 2.0e-4
    assert r["train"]["lr"] == 1.0e-3 and r["sample"]["steps"] == 25  # the profile's
    r = resolve(base, run={"profile": "tiny"}, overrides=["train.lr=5e-3", "sample.steps=9"])
    assert r["train"]["lr"] == 5e-3 and r["sample"]["steps"] == 9
    r = resolve(base, run={"profile": "tiny"}, overrides=["train.lr=5e-3"], sweep={"train.lr": 7e-3})
    assert r["train"]["lr"] == 7e-3
    # later command-line overrides win over earlier ones; dict overrides work as well
    assert resolve(base, overrides=["train.lr=1e-2", "train.lr=2e-2"])["train"]["lr"] == 2e-2
    assert resolve(base, overrides={"train.lr": 4e-3})["train"]["lr"] == 4e-3
    # a profile's per_dataset layer beats the profile itself, an override beats both
    r = resolve(base, run={"profile": "paper", "dataset": "celeba"}, overrides=["model.backbone=uvit_tiny"])
    assert r["model"]["backbone"] == "uvit_tiny"
    # resolve works on a copy
    assert base["train"]["lr"] == 3.0e-4 and base["data"]["name"] is None


def test_parse_override():
    assert parse_override("train.lr=1e-3") == ("train.lr", 1e-3)  # YAML 1.1 alone would give the string
    assert parse_override("train.lr=2.5E-4") == ("train.lr", 2.5e-4)
    assert parse_override("train.steps=200") == ("train.steps", 200)
    assert parse_override("model.init_from=null") == ("model.init_from", None)
    assert parse_override("model.kwargs={embed_dim: 32, num_heads: 2}") == (
        "model.kwargs", {"embed_dim": 32, "num_heads": 2})
    assert parse_override("data.path=a=b") == ("data.path", "a=b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("train.lr")


def test_unknown_key_names_the_key_and_the_allowed_keys(cfg, tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve(cfg, overrides=["train.lrr=1"])
    text = str(err.value)
    assert "train.lrr" in text
    for allowed in ("lr", "batch_size", "steps", "ema_decay"):
        assert allowed in text
    with pytest.raises(ConfigError, match="bogus") as err:
        resolve(cfg, overrides=["bogus.x=1"])
    assert "train" in str(err.value) and "sample" in str(err.value)
    with pytest.raises(ConfigError, match=r"train\.lrr.*allowed.*batch_size"):
        load_config(_yaml_with(tmp_path, train={"lrr": 1.0}))
    with pytest.raises(ConfigError, match=r"train\.lrr"):
        resolve(load_config(_yaml_with(tmp_path, profiles={"mine": {"train": {"lrr": 1.0}}})),
                run={"profile": "mine"})
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        resolve(load_config(_yaml_with(tmp_path, profiles={"mine": {"trian": {"lr": 1.0}}})),
                run={"profile": "mine"})


@pytest.mark.parametrize("override,key,value,kind", [
    ("train.lr=abc", "train.lr", "abc", "float"),
    ("train.steps=2.5", "train.steps", "2.5", "int"),
    ("train.betas=0.9", "train.betas", "0.9", "list"),
    ("sample.grid=maybe", "sample.grid", "maybe", "bool"),
    ("sample.sampler=3", "sample.sampler", "3", "str"),
])
def test_wrong_type_names_key_value_and_type(cfg, override, key, value, kind):
    with pytest.raises(ConfigError) as err:
        resolve(cfg, overrides=[override])
    text = str(err.value)
    assert key in text and value in text and kind in text


def test_numbers_are_coerced(cfg):
    r = resolve(cfg, overrides=["train.lr=1", "train.steps=1e2"])
    assert r["train"]["lr"] == 1.0 and isinstance(r["train"]["lr"], float)
    assert r["train"]["steps"] == 100 and isinstance(r["train"]["steps"], int)
    with pytest.raises(ConfigError, match="ema_decay"):
        resolve(cfg, overrides=["train.ema_decay=1.0"])
    with pytest.raises(ConfigError, match="sample.steps"):
        resolve(cfg, overrides=["sample.steps=0"])


@pytest.mark.parametrize("kind,name,close", [
    ("dataset", "mnst", "mnist"), ("method", "baselin", "baseline"), ("profile", "tinny", "tiny")])
def test_unknown_names_list_choices_and_suggest(cfg, kind, name, close):
    with pytest.raises(ConfigError) as err:
        resolve(cfg, run={kind: name})
    text = str(err.value)
    assert f"Did you mean {close!r}?" in text
    assert repr(name) in text
    valid = {"dataset": cfg["datasets"], "method": cfg["methods"], "profile": cfg["profiles"]}[kind]
    assert all(choice in text for choice in valid)


def test_unknown_backbone_and_sampler(cfg):
    with pytest.raises(ConfigError, match=r"Did you mean 'uvit_tiny'\?.*Valid:.*ddim_tiny"):
        resolve(cfg, overrides=["model.backbone=uvit_tny"])
    with pytest.raises(ConfigError, match=r"Did you mean 'dpm_solver'\?"):
        resolve(cfg, overrides=["sample.sampler=dpm_solvr"])


def test_set_key_refuses_new_keys():
    c = {"a": {"b": 1}}
    set_key(c, "a.b", 2)
    assert c == {"a": {"b": 2}}
    with pytest.raises(ConfigError, match="'a.c'"):
        set_key(c, "a.c", 1)


def test_config_hash(cfg):
    base = resolve(cfg, run={"profile": "tiny", "dataset": "mnist"})
    h = config_hash(base)
    assert isinstance(h, str) and len(h) == 12
    assert config_hash(resolve(cfg, run={"profile": "tiny", "dataset": "mnist"})) == h
    reordered = {k: (dict(reversed(list(v.items()))) if isinstance(v, dict) else v)
                 for k, v in reversed(list(base.items()))}
    assert config_hash(reordered) == h  # key order does not matter
    assert config_hash(resolve(cfg, overrides=["train.lr=3e-3"])) != h
    assert config_hash(resolve(cfg, run={"seed": 1})) != h
    assert config_hash(resolve(cfg, run={"dataset": "cifar10"})) != h
    assert config_hash(resolve(cfg, overrides=["model.kwargs={embed_dim: 32}"])) != h
    # what does not change the trained weights does not change the hash
    assert config_hash(resolve(cfg, overrides=["sample.steps=3", "sample.n_samples=4"])) == h
    assert config_hash(resolve(cfg, run={"results": "elsewhere"}, overrides=["run.runs_dir=x"])) == h


def test_config_hash_of_an_added_method_key(cfg):
    """A method key added later (deediff's uem_target) is out of the hash at the value that keeps the
    earlier behaviour, so that stored runs and checkpoints keep their hashes; any other value is in."""
    run = {"profile": "tiny", "dataset": "mnist", "method": "deediff"}
    stored = resolve(cfg, run=run)
    assert stored["method"]["uem_target"] == "noise"
    before = copy.deepcopy(stored)
    del before["method"]["uem_target"]  # a configuration from before the key existed
    assert config_hash(stored) == config_hash(before)
    assert config_hash(resolve(cfg, run=run, overrides=["methods.deediff.uem_target=data"])) != config_hash(stored)


def test_open_sections_take_any_keys(tmp_path):
    # constructor and sampler keywords are checked by the backbone / sampler, not by the config
    cfg = load_config(_yaml_with(tmp_path, model={"kwargs": {"patch_size": 4}}, sample={"options": {"order": 2}}))
    r = resolve(cfg, run={"profile": "tiny", "dataset": "mnist"})
    assert r["model"]["kwargs"] == {"patch_size": 4} and r["sample"]["options"] == {"order": 2}
    r = resolve(load_config(_yaml_with(tmp_path, profiles={"mine": {"sample": {"options": {"skip": "quad"}}}})),
                run={"profile": "mine"})
    assert r["sample"]["options"] == {"skip": "quad"}


def test_a_bad_method_hyper_parameter_names_the_method_and_the_choices():
    with pytest.raises(ConfigError, match=r"methods\.deediff.*loss_form='xx' is not one of \('paper', 'official'\)"):
        resolve(load_config(), run={"method": "deediff"}, overrides=["method.loss_form=xx"])


def test_library_overrides_reach_the_working_sections():
    """--set methods.<name>.x (and datasets.<name>.x) change what the run uses, like method.x does."""
    from bench.config import load_config, resolve

    cfg = resolve(load_config(), run={"method": "deediff"}, overrides=["methods.deediff.beta_ual=0.5"])
    assert cfg["method"]["beta_ual"] == 0.5
    cfg = resolve(load_config(), run={"method": "deediff"},
                  overrides=["methods.deediff.beta_ual=0.5", "method.beta_ual=0.25"])
    assert cfg["method"]["beta_ual"] == 0.25  # the working section's override wins
    cfg = resolve(load_config(), run={"dataset": "cifar10"}, overrides=["datasets.cifar10.flip=false"])
    assert cfg["data"]["flip"] is False
