"""Checkpoint files: atomic writes, safe loads (weights_only), and where each run keeps them."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
from torch import nn

from bench.atomic import atomic_write
from bench.config import config_hash


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
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle that wants code, or a damaged file
        raise RuntimeError(f"cannot load {path} as a weights-only checkpoint: {err}") from None


def load_weights_into(model: nn.Module, spec: str | Path, prefer: str = "ema", drop_extras: bool = False) -> set[str]:
    """Load weights into a DiffusionModel from one of ours or an official backbone state dict.

    Ours hold {"ema": ..., "model": ...} with keys "backbone.*" and "extras.*"; an official
    U-ViT or DDIM checkpoint is a bare backbone state dict and must match it exactly.
    drop_extras: leave out the file's method modules that the model does not have (a method that
    evaluates another's weights: static exits of a DeeDiff checkpoint).
    Returns the model's state-dict keys that came from the file (the rest keep their fresh
    initialisation: a method's new modules, the DDIM U-Net's exit heads).
    """
    state = load_checkpoint(spec)
    if prefer in state or "model" in state:
        weights = state.get(prefer, state.get("model"))
        weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}
        own = model.state_dict()
        if drop_extras:
            weights = {k: v for k, v in weights.items() if not k.startswith("extras.") or k in own}
        missing_extras = {k: v for k, v in own.items() if k.startswith("extras.") and k not in weights}
        load_state_into(model, {**missing_extras, **weights})
        return set(weights) - _untrained_exit_heads(state, weights)
    # An official checkpoint has no per-exit heads (DDIM U-Net): those, and only those, may be missing.
    result = model.backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("exit_heads.")]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{spec} does not match {model.backbone.__class__.__name__}: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    return {f"backbone.{k}" for k in state}


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
