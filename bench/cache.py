"""The one home of the harness's caches: Inception weights and reference statistics, the latent
stand-ins, everything that is computed once per machine and reused."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else $BENCH_CACHE, else ~/.cache/eebench."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("BENCH_CACHE") or Path.home() / ".cache" / "eebench").expanduser()
