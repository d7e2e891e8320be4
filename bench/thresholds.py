"""Thresholds: one grammar on the command line, one range check everywhere (eval, sweeps, config)."""
from __future__ import annotations

import math

from bench.config import ConfigError

FULL_DEPTH = ("full", "none", "null")  # spellings of "nothing exits" in --thresholds


def _split(text: str) -> list[str]:
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ConfigError("--thresholds is empty; give a comma-separated list (for example --thresholds full,0.1,0.05)")
    return items


def parse_thresholds(text: str) -> list[float | None]:
    """'full,0.1,0.05' -> [None, 0.1, 0.05] ('full' is full depth: nothing exits)."""
    out: list[float | None] = []
    for item in _split(text):
        if item.lower() in FULL_DEPTH:
            out.append(None)
            continue
        try:
            out.append(float(item))
        except ValueError:
            raise ConfigError(f"--thresholds: {item!r} is not a number or 'full' "
                              f"(for example --thresholds full,0.1,0.05)") from None
    return out


def check_thresholds(cfg: dict, method, thresholds: list) -> None:
    """Every threshold a finite number inside the method's exit-signal range (None: full depth)."""
    # a range that the backbone sets (static exits: 0 .. its blocks - 1) is checked once the method is attached
    low_high = None if method.range_pending else method.threshold_range
    for t in thresholds:
        if t is None:
            continue
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise ConfigError(f"threshold {t!r} of {cfg['run']['method']} is not a finite number (or 'full' for full depth)")
        if low_high is not None and not low_high[0] <= t <= low_high[1]:
            raise ConfigError(f"threshold {t} is outside the range of {cfg['run']['method']}'s exit signal "
                              f"[{low_high[0]}, {low_high[1]}] ({method.signal})")
