"""One configuration object with one override order.

    defaults (bench/defaults.yaml)  ->  bench.yaml  ->  profile  ->  command line  ->  sweep

A profile's own layers apply in this order: the profile, its `per_method.<method>`, its
`per_dataset.<dataset>`, and that entry's `per_method.<method>`.

The library sections `datasets`, `profiles` and `methods` describe what exists; `run`
names what to run (method, dataset, profile, seed). `resolve` expands the chosen profile,
dataset and method into the working sections `data`, `model`, `train`, `sample` and
`method`, applies `key=value` overrides, validates the result and returns it as a plain
dict. The resolved config is saved with every checkpoint and every result row.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from bench.errors import UserError

WORKING_SECTIONS = ("data", "model", "train", "sample", "eval", "method")
EMA_RAMPS = ("fresh", "all", "none")  # train.ema_ramp (bench/train.py, ramped_parameters)


class ConfigError(UserError, ValueError):
    """A configuration problem a user can fix; the message names the key."""


def _load_yaml(path: Path | str, text: str | None = None) -> dict:
    try:
        data = yaml.safe_load(text if text is not None else Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def load_defaults() -> dict:
    """The built-in defaults shipped inside the package."""
    text = resources.files("bench").joinpath("defaults.yaml").read_text()
    return _load_yaml("bench/defaults.yaml", text)


def deep_merge(base: dict, override: dict, where: str = "", strict: bool = True) -> dict:
    """`base` updated by `override`, recursively; with strict, unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in (override or {}).items():
        path = f"{where}.{key}" if where else str(key)
        if strict and key not in out:
            allowed = ", ".join(sorted(map(str, out))) or "(none)"
            raise ConfigError(f"unknown config key {path!r}; allowed here: {allowed}")
        if isinstance(out.get(key), dict) and isinstance(value, dict):
            out[key] = deep_merge(out[key], value, path, strict=strict and not _is_open(path))
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_open(path: str) -> bool:
    """Sections whose set of keys is the user's to extend (new datasets, profiles, methods...)."""
    if path in ("model.kwargs", "sample.options"):
        return True  # constructor and sampler keywords: checked by the backbone or sampler
    parts = path.split(".")
    if parts[0] in ("datasets", "profiles", "methods") and len(parts) == 1:
        return True
    if parts[0] == "profiles" and len(parts) >= 2:
        return True  # a profile overrides any working section; checked after expansion
    if parts[0] == "methods" and len(parts) >= 2:
        return True  # method hyper-parameters are checked by the method itself
    return False


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-3' -> ('train.lr', 0.001); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (for example train.lr=1e-3)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _EXPONENT_NUMBER.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    return key.strip(), value


_EXPONENT_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def set_key(cfg: dict, dotted: str, value: Any) -> None:
    """Set cfg['a']['b'] = value for 'a.b', refusing keys that do not exist."""
    node = cfg
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            where = ".".join(parts[:depth]) or "the top level"
            allowed = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
            raise ConfigError(f"unknown config key {dotted!r}: {where} has no {part!r}; allowed: {allowed}")
        if depth == len(parts) - 1:
            declared = _declared_default(dotted)
            node[part] = _coerce(dotted, node[part], value) if declared is _UNDECLARED else \
                _typed(dotted, declared, value)
        else:
            node = node[part]


_UNDECLARED = object()


def _declared_default(dotted: str) -> Any:
    """The default of a schema key (section.key of bench/defaults.yaml), else _UNDECLARED (open sections)."""
    parts = dotted.split(".")
    defaults = _defaults_cached()
    if len(parts) != 2 or parts[0] not in SCHEMA_SECTIONS or parts[1] not in defaults[parts[0]]:
        return _UNDECLARED
    return defaults[parts[0]][parts[1]]


@functools.lru_cache(maxsize=1)
def _defaults_cached() -> dict:
    return load_defaults()


def _coerce(key: str, old: Any, value: Any) -> Any:
    """Check a value against the type of the default it replaces."""
    if old is None or value is None:
        return value
    if isinstance(old, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(old, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(old, float):
            return float(value)
        if isinstance(value, int) or value.is_integer():  # an int key: 1e4 is fine, 2.5 is not
            return int(value)
    elif isinstance(old, str) and isinstance(value, str):
        return value
    elif isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)):
        return list(value)
    elif isinstance(old, dict) and isinstance(value, dict):
        return value
    raise ConfigError(f"config key {key!r} expects {_a(type(old))} (like {old!r}), got {value!r}")


def load_config(path: Path | str | None = None) -> dict:
    """Defaults merged with a bench.yaml (the one given, else ./bench.yaml if present)."""
    cfg = load_defaults()
    if path is None:
        beside_package = Path(__file__).resolve().parents[1] / "bench.yaml"  # editable install
        path = next((p for p in (Path("bench.yaml"), beside_package) if p.exists()), None)
    if path is not None:
        if not Path(path).exists():
            raise ConfigError(f"config file {path} does not exist")
        cfg = deep_merge(cfg, _load_yaml(path))
        cfg["run"]["config_file"] = str(path)
    return cfg


def resolve(cfg: dict, run: dict | None = None, overrides: list[str] | dict | None = None,
            sweep: dict | None = None) -> dict:
    """Expand profile, dataset and method, apply overrides (command line, then sweep), validate."""
    cfg = copy.deepcopy(cfg)
    for key, value in (run or {}).items():
        if value is not None:
            set_key(cfg, f"run.{key}", value)
    r = cfg["run"]
    items = list(overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or []))
    # Overrides of the library (datasets.*, profiles.*, methods.*) change what the expansion below
    # copies into the working sections, so they come first; the rest override the expanded result.
    library = [(k, v) for k, v in items if k.split(".")[0] in ("datasets", "profiles", "methods")]
    items = [(k, v) for k, v in items if (k, v) not in library]

    from bench.data import DATASETS
    from methods import METHODS

    # A registered dataset or method needs no bench.yaml entry; the entry adds paths and settings.
    for name in DATASETS.names():
        cfg["datasets"].setdefault(name, {"name": name})
    for name in METHODS.names():
        cfg["methods"].setdefault(name, {})
    for key, value in library:
        set_key(cfg, key, value)
    _check_name("profile", r["profile"], cfg["profiles"])
    _check_name("dataset", r["dataset"], cfg["datasets"])
    _check_name("method", r["method"], cfg["methods"])

    profile = cfg["profiles"][r["profile"]]
    per_dataset = (profile.get("per_dataset") or {}).get(r["dataset"], {})
    for where in (profile, per_dataset):
        for name in (where.get("per_method") or {}):
            _check_name("method (in a profile's per_method)", name, cfg["methods"])
    layers = [("profile " + r["profile"], profile),
              ("profile per_method", (profile.get("per_method") or {}).get(r["method"], {})),
              ("profile per_dataset", per_dataset),
              ("profile per_dataset per_method", (per_dataset.get("per_method") or {}).get(r["method"], {}))]
    for layer_name, layer in layers:
        for section, values in layer.items():
            if section in ("per_dataset", "per_method", "description"):
                continue
            if section not in WORKING_SECTIONS:
                raise ConfigError(f"{layer_name}: unknown section {section!r}; allowed: {', '.join(WORKING_SECTIONS)}")
            # a profile's `method` part sets the method's hyper-parameters (checked by the plugin) over the library's
            cfg[section] = deep_merge(cfg[section], values, section, strict=section != "method")

    cfg["data"] = deep_merge(cfg["data"], cfg["datasets"][r["dataset"]], "data")
    profile_method = cfg["method"]
    cfg["method"] = deep_merge(deep_merge(cfg["method"], cfg["methods"][r["method"]], "method", strict=False),
                               profile_method, "method", strict=False)

    for key, value in items:
        set_key(cfg, key, value)
    for key, value in (sweep or {}).items():
        set_key(cfg, key, value)
    # what was overridden, in order, so that the run can be resolved again for another method (resolve_for)
    cfg["run"]["overrides"] = [[k, v] for k, v in [*library, *items, *(sweep or {}).items()]]
    validate(cfg)
    return cfg


def resolve_for(cfg: dict, method: str) -> dict:
    """The resolved `cfg` resolved again for another method: the same bench.yaml, library, run settings,
    profile layers and overrides, except the first method's own hyper-parameters (`method.*`). Used
    where one method evaluates another's trained weights (static exits of the DeeDiff checkpoint)."""
    base = load_config(cfg["run"]["config_file"]) if cfg["run"]["config_file"] else load_defaults()
    for section in ("datasets", "profiles", "methods"):  # library overrides are already applied here
        base[section] = copy.deepcopy(cfg[section])
    run = {k: v for k, v in cfg["run"].items() if k not in ("config_file", "overrides")}
    run["method"] = method
    overrides = {k: v for k, v in cfg["run"]["overrides"]  # the threshold is the first method's operating point
                 if k.split(".")[0] not in ("method", "datasets", "profiles", "methods") and k != "sample.threshold"}
    return resolve(base, run, overrides)


def _check_name(kind: str, name: str, table: dict) -> None:
    if name not in table:
        import difflib

        close = difflib.get_close_matches(str(name), list(table), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"unknown {kind} {name!r}.{hint} Valid: {', '.join(sorted(table))}")


# ---- the schema: bench/defaults.yaml defines every key and its type; these tables add what a
# default value cannot say. A test checks that every key named here exists in the defaults.

# The type of each key whose default is null (every other key takes the type of its default).
NULLABLE_TYPES = {
    "run.config_file": str, "data.name": str, "data.path": str, "data.resolution": int, "data.limit": int,
    "model.init_from": str, "sample.threshold": float, "sample.guidance_scale": float,
    "eval.reference_per_class": int, "eval.reference_limit": int, "sweep.gpus_per_trial": float,
    "sweep.storage": str,
}
# Keys that take an int or a float, kept as given (their defaults are ints).
NUMBERS = ("sweep.cpus_per_trial", "train.max_seconds", "train.cpus_per_worker")
# Closed sets of values.
CHOICES = {
    "train.precision": ("auto", "bf16", "fp32"), "train.ema_ramp": EMA_RAMPS,
    "sample.engine_mode": ("realised", "simulate"), "sample.precision": ("fp32", "bf16"), "data.condition": ("none", "class", "text"),
    "model.schedule": ("vp", "linear", "scaled_linear"),
}
# Lower bounds: (bound, inclusive). Floats are also checked to be finite.
MINIMUM = {
    "train.steps": (0, True), "train.max_seconds": (0, True), "train.batch_size": (1, True), "train.lr": (0, False),
    "train.weight_decay": (0, True), "train.warmup_steps": (0, True), "train.ema_decay": (0, True),
    "train.extras_lr_mult": (0, False), "train.exit_calibration_steps": (0, True), "train.grad_clip": (0, True),
    "train.log_every": (1, True), "train.ckpt_every": (1, True), "sample.steps": (1, True),
    "sample.n_samples": (1, True), "sample.batch_size": (1, True), "sample.guidance_scale": (0, True),
    "data.resolution": (1, True), "data.limit": (1, True), "data.num_workers": (0, True), "data.p_uncond": (0, True),
    "eval.fid_batch_size": (1, True), "eval.loss_buckets": (0, True), "eval.loss_images": (1, True),
    "eval.reference_per_class": (1, True), "eval.reference_limit": (2, True), "sweep.cpus_per_trial": (0, False),
    "sweep.gpus_per_trial": (0, True), "train.num_workers": (1, True), "train.cpus_per_worker": (0, False),
}
# Upper bounds: (bound, inclusive).
MAXIMUM = {
    "train.ema_decay": (1, False), "data.p_uncond": (1, False),
    # 50,000 is the paper's FID sample count; far more is a typo that would run for days
    "sample.n_samples": (1_000_000, True),
}
SCHEMA_SECTIONS = ("run", *WORKING_SECTIONS[:-1], "sweep")  # `method` is the plugin's to check


def check_types(cfg: dict, defaults: dict | None = None) -> None:
    """Every key of the resolved config has its declared type (ints read as floats where a float is
    expected), lies in its range and its set of choices; raises ConfigError naming the key."""
    defaults = load_defaults() if defaults is None else defaults
    for section in SCHEMA_SECTIONS:
        for key, default in defaults[section].items():
            name, value = f"{section}.{key}", cfg[section].get(key)
            # an int where a float is expected stays an int here (bench.yaml's `lr: 1`), as it always
            # was, so that the config hashes of existing runs do not change; --set converts it
            cfg[section][key] = _typed(name, default, value, convert_ints=False)
    for name, choices in CHOICES.items():
        section, key = name.split(".")
        if cfg[section][key] not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; got {cfg[section][key]!r}")
    for table, below in ((MINIMUM, True), (MAXIMUM, False)):
        for name, (bound, inclusive) in table.items():
            section, key = name.split(".")
            value = cfg[section][key]
            if value is None:
                continue
            ok = (value >= bound if inclusive else value > bound) if below else \
                (value <= bound if inclusive else value < bound)
            if not ok:
                relation = (">=" if inclusive else ">") if below else ("<=" if inclusive else "<")
                raise ConfigError(f"{name} must be {relation} {bound:,}, got {value!r}")


def _typed(name: str, default: Any, value: Any, convert_ints: bool = True) -> Any:
    """`value` checked against the type of `default` (or NULLABLE_TYPES), and converted where lossless."""
    expected = NULLABLE_TYPES.get(name, type(default)) if default is None or name in NULLABLE_TYPES else type(default)
    if name in NUMBERS:
        expected = float
        convert_ints = False
    if value is None:
        if default is None or name in NULLABLE_TYPES:
            return None
        raise ConfigError(f"config key {name!r} cannot be null; it expects {_a(expected)} (like {default!r})")
    if expected is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise ConfigError(f"config key {name!r} must be a finite number, got {value!r}")
        return float(value) if convert_ints else value
    if expected is int and isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if expected is list and isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, expected) and not (expected is not bool and isinstance(value, bool)):
        return value
    like = f" (like {default!r})" if default is not None else ""
    raise ConfigError(f"config key {name!r} expects {_a(expected)}{like}, got {value!r}")


def _a(kind: type) -> str:
    """'an int', 'a float': the type named in a message."""
    return ("an " if kind.__name__[0] in "aeiou" else "a ") + kind.__name__


def check_keywords(where: str, fn, values: dict, reserved: tuple[str, ...] = ()) -> None:
    """`values` are keywords that `fn` accepts, with the types its annotations declare (sample.options
    against the sampler's signature); raises ConfigError naming the key and the valid ones."""
    import inspect
    import typing

    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of keyword: value, got {values!r}")
    signature = inspect.signature(fn)
    if any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values()):
        return  # it passes options on (dpm_solver++ to dpm_solver): the sampler itself checks them
    params = {n: p for n, p in signature.parameters.items()
              if n not in reserved and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that cannot be evaluated here: check the names only
        hints = {}
    for key, value in values.items():
        if key not in params:
            raise ConfigError(f"{where}.{key} is not an option of {getattr(fn, '__name__', fn)}; valid: "
                              f"{', '.join(params)}")
        if key in hints and not _fits(value, hints[key]):
            raise ConfigError(f"{where}.{key} expects {_hint_text(hints[key])}, got {value!r}")


def _fits(value: Any, hint: Any) -> bool:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    if hint in (bool, str):
        return isinstance(value, hint)
    return True  # containers, callables, tensors: not checked here


def _hint_text(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def validate(cfg: dict) -> None:
    """Types and ranges (check_types), then what needs more than a type: names of registered things."""
    check_types(cfg)
    t, s, d = cfg["train"], cfg["sample"], cfg["data"]
    if len(t["betas"]) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in t["betas"]):
        raise ConfigError(f"train.betas must be two numbers in [0, 1), got {t['betas']}")
    if t["batch_size"] % t["num_workers"]:
        raise ConfigError(f"train.batch_size={t['batch_size']} does not split evenly over train.num_workers="
                          f"{t['num_workers']} workers; use a batch size divisible by the worker count")
    from backbones import BACKBONES
    from bench.diffusion import SAMPLERS

    for kind, name, registry in (("model.backbone", cfg["model"]["backbone"], BACKBONES),
                                 ("sample.sampler", s["sampler"], SAMPLERS)):
        if name not in registry:
            raise ConfigError(f"{kind}: {registry.unknown_message(name)}")
    # what the engine and the run pass to every sampler themselves
    check_keywords("sample.options", SAMPLERS.get(s["sampler"]), s["options"],
                   reserved=("eps_fn", "schedule", "noise", "shape", "steps", "progress", "callback", "device",
                             "dtype", "x_init"))
    if not isinstance(cfg["model"]["kwargs"], dict):
        raise ConfigError(f"model.kwargs must be a mapping of constructor keyword: value, got {cfg['model']['kwargs']!r}")
    from methods import build_method

    try:  # the plugin checks its own hyper-parameters
        method = build_method(cfg["run"]["method"], cfg["method"])
    except ValueError as err:
        raise ConfigError(f"methods.{cfg['run']['method']} (bench.yaml or --set method.KEY=...): {err}") from None
    from bench.thresholds import check_thresholds

    check_thresholds(cfg, method, [s["threshold"], method.threshold])
    if cfg["eval"]["fid"] and s["n_samples"] < 2:
        raise ConfigError(f"eval.fid needs sample.n_samples >= 2 (a covariance of one image is undefined); got "
                          f"{s['n_samples']}")
    if s["guidance_scale"] and d["condition"] == "none":
        raise ConfigError("sample.guidance_scale is set but the dataset is unconditional (data.condition: none)")
    from bench.engine.executor import GUIDANCE_EXITS

    if s["guidance_exit"] not in GUIDANCE_EXITS:
        raise ConfigError(f"sample.guidance_exit must be one of {', '.join(GUIDANCE_EXITS)}; got {s['guidance_exit']!r}")


# Method keys added after runs were stored, with the value that keeps the earlier behaviour: at that
# value they stay out of the hash, so that the earlier runs' hashes (and their checkpoints) still hold.
ADDED_METHOD_KEYS = {"deediff": {"uem_target": "noise"}}

# Method keys that act only when sampling (the exit rule), with their defaults. They do not change the
# trained weights, so the training hash (config_hash: the checkpoint's name) holds them at these
# values, the ones every stored run was trained with: a run that changes them samples the same
# checkpoint. Result rows tell the variants apart (bench.evaluate.measure.row_hash; the reporters).
INFERENCE_METHOD_KEYS = {"deediff": {"exit_rule": "per_sample", "patience": 1, "patience_reset": False},
                         "calm": {"compare": "auto"}}


def inference_options(cfg: dict) -> dict:
    """The run's inference-only method keys that differ from their defaults ({}: the default exit rule).
    DeeDiff's patience_reset is left out where patience is 0 (nothing to reset: it acts as the default).
    An explicit CALM `compare` that equals what `auto` picks on the backbone is not recognised as the
    default: its cells are its own (telling would need the backbone built)."""
    defaults = INFERENCE_METHOD_KEYS.get(cfg["run"]["method"], {})
    rule = {k: cfg["method"][k] for k, v in defaults.items() if k in cfg["method"] and cfg["method"][k] != v}
    if cfg["run"]["method"] == "deediff" and cfg["method"].get("patience") == 0:
        rule.pop("patience_reset", None)
    return rule


def config_hash(cfg: dict, sections: tuple[str, ...] = ("data", "model", "train", "method")) -> str:
    """A short stable hash of what determines a trained model (not sampling or run bookkeeping)."""
    relevant = {key: cfg[key] for key in sections}
    # Bookkeeping that does not change the trained weights stays out of the hash.
    cosmetic = {"train": ("log_every", "ckpt_every", "progress", "cpus_per_worker"),
                "data": ("num_workers", "preload", "download")}
    for section, keys in cosmetic.items():
        if section in relevant:
            relevant[section] = {k: v for k, v in relevant[section].items() if k not in keys}
    if "train" in relevant:  # recipe keys at values that change nothing: out, so older hashes still hold
        train = dict(relevant["train"])
        # num_workers: N > 1 workers give one process's weights only for losses that are means over
        # samples (bench/distributed.py), so N is in the hash; 1 is out, as before the key existed
        for key, neutral in (("extras_lr_mult", 1.0), ("exit_calibration_steps", 0), ("num_workers", 1)):
            if train.get(key) == neutral:
                train.pop(key)
        if train.get("ema_ramp") == "all" or (train.get("ema_ramp") == "fresh" and not cfg["model"]["init_from"]):
            train.pop("ema_ramp")  # from scratch, every parameter is fresh: the ramp applies to all alike
        relevant["train"] = train
    if "method" in relevant:  # the operating point and the sweep grid do not change the trained model
        neutral = ADDED_METHOD_KEYS.get(cfg["run"]["method"], {})
        sampling_only = INFERENCE_METHOD_KEYS.get(cfg["run"]["method"], {})
        relevant["method"] = {k: sampling_only.get(k, v) for k, v in cfg["method"].items()
                              if k not in ("threshold", "thresholds") and not (k in neutral and neutral[k] == v)}
    relevant["run"] = {key: cfg["run"][key] for key in ("seed", "method", "dataset")}
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
