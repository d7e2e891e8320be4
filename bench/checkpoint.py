"""Checkpoint files: atomic writes, safe loads (weights_only), and where each run keeps them."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from bench.atomic import atomic_write
from bench.config import config_hash
from bench.errors import CheckpointError


def atomic_save(obj: dict, path: Path) -> None:
    """torch.save that never leaves a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_dir(cfg: dict) -> Path:
    """runs/<method>-<dataset>-<profile>-<hash of what determines the trained weights>."""
    r = cfg["run"]
    return Path(r["runs_dir"]) / f"{r['method']}-{r['dataset']}-{r['profile']}-{config_hash(cfg)}"


def resolve_checkpoint_path(spec: str) -> Path:
    """A path, or "builtin:NAME" for a file shipped in bench/assets."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = Path(str(resources.files("bench").joinpath("assets", name)))
        if not path.exists():
            raise FileNotFoundError(f"built-in checkpoint {name!r} is not in {path.parent}")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist (set model.init_from, or train one with `bench train`)")
    return path


def load_checkpoint(spec: str | Path) -> dict:
    """Load a checkpoint without running any code from it (weights_only=True)."""
    path = resolve_checkpoint_path(str(spec))
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the checkpoint file inside it (final.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that wants code, or a damaged, truncated or empty file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise CheckpointError(f"cannot load {path} as a weights-only checkpoint ({first}); it is damaged, not a "
                              f"PyTorch checkpoint, or holds objects that would run code. Re-create it (bench "
                              f"train / bench export) or give another file") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint (a dict of weights)")
    return state


def load_weights_into(model: nn.Module, spec: str | Path, prefer: str = "ema", drop_extras: bool = False,
                      fresh_extras: bool = True, state: dict | None = None) -> set[str]:
    """Load weights into a DiffusionModel from one of ours or an official backbone state dict.

    Ours hold {"ema": ..., "model": ...} with keys "backbone.*" and "extras.*"; an official
    U-ViT or DDIM checkpoint is a bare backbone state dict and must match it exactly.
    drop_extras: leave out the file's method modules that the model does not have (a method that
    evaluates another's weights: static exits of a DeeDiff checkpoint).
    fresh_extras: a method module the file lacks keeps its fresh initialisation (a fine-tune from a
    baseline adds new modules); False makes that an error (a trained checkpoint being evaluated).
    Returns the model's state-dict keys that came from the file (the rest keep their fresh
    initialisation: a method's new modules, the DDIM U-Net's exit heads).
    """
    state = load_checkpoint(spec) if state is None else state  # `state`: the file's contents, already loaded
    if prefer in state or "model" in state:
        weights = state.get(prefer, state.get("model"))
        weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        own = model.state_dict()
        if drop_extras:
            weights = {k: v for k, v in weights.items() if not k.startswith("extras.") or k in own}
        missing_extras = {k: v for k, v in own.items() if k.startswith("extras.") and k not in weights}
        if missing_extras and not fresh_extras:
            raise CheckpointError(f"{spec} has no weights for this method's modules ({', '.join(sorted(missing_extras)[:3])}"
                                  f"{', ...' if len(missing_extras) > 3 else ''}): it was trained by "
                                  f"{_trained_by(state)}; evaluate it with that method, or train this one")
        try:
            load_state_into(model, {**missing_extras, **weights})
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors: another backbone or method
            raise CheckpointError(f"{spec} does not fit this model ({_first_lines(err)}); it was trained by "
                                  f"{_trained_by(state)}") from None
        return set(weights) - _untrained_exit_heads(state, weights)
    # An official checkpoint has no per-exit heads (DDIM U-Net): those, and only those, may be missing.
    try:
        result = model.backbone.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensors of another shape: another size of backbone
        raise CheckpointError(f"{spec} does not fit {model.backbone.__class__.__name__} ({_first_lines(err)})") from None
    missing = [k for k in result.missing_keys if not k.startswith("exit_heads.")]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"{spec} does not match {model.backbone.__class__.__name__}: missing {missing[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return {f"backbone.{k}" for k in state}


def _trained_by(state: dict) -> str:
    """'method deediff, backbone uvit_tiny, dataset mnist, profile study (config 1a2b...)' from a checkpoint."""
    cfg = state.get("config") or {}
    r, m = cfg.get("run") or {}, cfg.get("model") or {}
    if not r:
        return "an unknown configuration (the file stores none)"
    return (f"method {r.get('method')}, backbone {m.get('backbone')}, dataset {r.get('dataset')}, profile "
            f"{r.get('profile')} (config {state.get('config_hash', '?')})")


def check_identity(state: dict, cfg: dict, path: str | Path) -> None:
    """Refuse a checkpoint whose stored config hash is not the run's: a file copied into another run's
    folder would otherwise be evaluated, and its rows labelled, as that run."""
    stored, expected = state.get("config_hash"), config_hash(cfg)
    if stored != expected:
        r = cfg["run"]
        raise CheckpointError(
            f"{path} belongs to another configuration: it was trained by {_trained_by(state)}, but this run is "
            f"method {r['method']}, backbone {cfg['model']['backbone']}, dataset {r['dataset']}, profile "
            f"{r['profile']} (config {expected}). Move the file away, or run the command with its configuration")


def _first_lines(err: Exception, n: int = 2) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(lines[:n])[:400]


def _untrained_exit_heads(state: dict, weights: dict) -> set[str]:
    """The DDIM U-Net's per-exit heads in a checkpoint whose method never trained them (the baseline's:
    they are at their random initialisation, so a fine-tune counts them as fresh, not loaded)."""
    from methods import METHODS

    name = ((state.get("config") or {}).get("run") or {}).get("method")
    if name in METHODS.names() and METHODS.get(name).trains_exits:
        return set()
    return {k for k in weights if k.startswith("backbone.exit_heads.")}


def load_state_into(model: nn.Module, weights: dict, strict: bool = True):
    """model.load_state_dict(weights), after each extras module that has `fit_to_weights(model, weights)`
    has fitted the freshly built model to the weights (the pruning method re-creates its pruned widths)."""
    for module in getattr(model, "extras", {}).values():
        fit = getattr(module, "fit_to_weights", None)
        if fit is not None:
            fit(model, weights)
    return model.load_state_dict(weights, strict=strict)


def export_weights(src: str | Path, dst: str | Path, half: bool = True) -> Path:
    """A small inference checkpoint: the EMA weights (in float16 if `half`), config and provenance."""
    state = load_checkpoint(src)
    weights = state.get("ema", state.get("model"))
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    keep = {k: state[k] for k in ("step", "seconds", "config", "config_hash") if k in state}
    atomic_save({"ema": weights, **keep}, Path(dst))
    return Path(dst)
