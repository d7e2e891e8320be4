"""Read the results CSVs (and only them) into tidy pandas frames for the tables and figures.

`runs.csv` gains a few derived columns: `thr` (the threshold as a float, NaN = full depth),
`reduction` (1 - layer_ratio), `options` (method_options parsed) and `model_key` (which trained
model and which measurement run a row belongs to). Files written before a column existed (old
`runs.csv` without `method_options`, `run_id` ...) load with that column empty.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench.cell import ROW_COLUMNS
from bench.errors import UserError
from bench.store import read_rows

# Columns the reporters read (the runs.csv schema, bench.cell.ROW_COLUMNS); any that a CSV lacks
# (an older one) are added empty.
RUN_COLUMNS = ROW_COLUMNS
NUMERIC = ("steps", "seed", "n_samples", "batch_size", "train_steps", "layer_ratio", "gflops", "seconds_per_image",
           "measured_speedup", "fid", "kid", "fid_n_reference", "passes_per_call")
# One measurement run: the rows that one `bench eval` wrote for one trained model (its thresholds).
RUN_GROUP = ("experiment", "method", "backbone", "dataset", "profile", "config_hash", "sampler", "steps", "seed",
             "n_samples", "batch_size", "mode", "sampler_options", "fid_reference")
# How a number was obtained: the parts a footnote names.
PROVENANCE = ("scale", "profile", "backbone", "sampler", "steps", "n_samples", "seed", "batch_size", "mode",
              "train_steps", "fid_n_reference", "fid_reference", "standin", "autoencoder", "encoders_random_init")
SIDE_FILES = ("per_call", "trajectory", "layer_mse", "loss_per_timestep")

DATASET_NAMES = {"cifar10": "CIFAR-10", "celeba": "CelebA 64", "imagenet256": "ImageNet 256", "mscoco": "MS-COCO",
                 "mnist": "MNIST", "imagefolder": "image folder"}
METHOD_NAMES = {"baseline": "U-ViT", "deediff": "DeeDiff", "bertxit": "BERxiT", "calm": "CALM", "static": "Static EE",
                "small": "Small model", "pruning": "S-Pruning"}


class ReportError(UserError, ValueError):
    """A report that cannot be made as asked (bad option, no results); the message says what to do."""


class NoResultsError(FileNotFoundError):
    """No runs.csv where the report looks; the message names the command that makes one."""


def is_standin(value) -> bool:
    """Whether a row's `standin` cell marks stand-in data (anything but empty / false)."""
    return str(value).strip().lower() not in ("", "false", "0", "none", "nan")


def dataset_name(name: str) -> str:
    return DATASET_NAMES.get(name, name)


def method_name(method: str, backbone: str = "") -> str:
    if method == "baseline" and str(backbone).startswith("ddim"):
        return "DDIM U-Net"
    return METHOD_NAMES.get(method, method)


def parse_options(text) -> dict:
    """method_options JSON -> dict; an empty or missing cell (older CSVs) is {} = the method's defaults."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def variant_label(method: str, options: dict) -> str:
    """A short name for a non-default variant of a method ('' for the defaults)."""
    parts = []
    if method == "deediff":
        if options.get("layerwise_loss") is False:
            parts.append("no UA-loss")
        if options.get("shared_uem") is True:
            parts.append("shared UEM")
        if options.get("beta_ual", 1.0) != 1.0:
            parts.append(f"beta {options['beta_ual']:g}")
        if options.get("loss_form") == "paper":
            parts.append("paper loss form")
        if options.get("uem_target", "noise") != "noise":
            parts.append(f"{options['uem_target']} target")
        if options.get("exit_rule") == "batch_mean":
            parts.append("batch-mean rule")
        if options.get("patience", 1) != 1:
            parts.append(f"patience {options['patience']}")
        if options.get("patience_reset") is True:
            parts.append("consecutive crossings")
    if method == "calm" and options.get("compare", "auto") != "auto":
        parts.append(f"compare {options['compare']}")
    if method == "static":
        parts.append("time schedule" if options.get("schedule") == "time" else "fixed exit")
    return ", ".join(parts)


@dataclass
class Results:
    """The CSVs of one results directory, loaded once."""

    root: Path
    runs: pd.DataFrame
    _side: dict = field(default_factory=dict)

    def side(self, name: str) -> pd.DataFrame:
        """per_call / trajectory / layer_mse / loss_per_timestep (empty frame when the file is absent)."""
        if name not in self._side:
            path = self.root / f"{name}.csv"
            if path.exists():
                read_rows(path)  # a damaged file: a clear ResultsError rather than a parser's traceback
            self._side[name] = pd.read_csv(path) if path.exists() else pd.DataFrame(columns=["run_id"])
        return self._side[name]

    def num_blocks(self, run_id) -> int | None:
        """How many exits (blocks) the run's model has, from its per-call exit histogram columns."""
        for name, prefix in (("per_call", "exits_block_"), ("layer_mse", "mse_exit_")):
            frame = self.side(name)
            rows = frame[frame["run_id"] == run_id]
            if len(rows):
                cols = [c for c in rows.columns if c.startswith(prefix)]
                return int(rows.iloc[0][cols].notna().sum())
        return None

    def resolve(self, path) -> Path | None:
        """A file a row points to (a grid): as stored, relative to the results folder's parents, or by name
        under <results>/grids (a results folder that was moved keeps working)."""
        if not isinstance(path, str) or not path:
            return None
        p = Path(path)
        for candidate in (p, self.root / p, self.root.parent / p, self.root.parent.parent / p,
                          self.root / "grids" / p.name):
            if candidate.is_file():
                return candidate
        return None

    def rows_for_hash(self, config_hash: str) -> pd.DataFrame:
        return self.runs[self.runs["config_hash"] == config_hash]


def load_results(root, profile: str | None = None, experiment: str | None = None) -> Results:
    """runs.csv of `root` (filtered by profile/experiment when given) plus the per-call files."""
    root = Path(root)
    path = root / "runs.csv"
    if not path.exists():
        raise NoResultsError(f"no results in {root}: {path} does not exist. Make rows with `bench run` or "
                             f"`bench eval --thresholds full,...` (or `bench sweep thresholds`) "
                             f"with --results {root}")
    read_rows(path)  # a damaged file: a clear ResultsError rather than a parser's traceback
    runs = pd.read_csv(path, dtype=str, keep_default_na=False)
    for col in RUN_COLUMNS:
        if col not in runs.columns:
            runs[col] = ""
    for col in NUMERIC:
        runs[col] = pd.to_numeric(runs[col], errors="coerce")
    runs["thr"] = pd.to_numeric(runs["threshold"], errors="coerce")
    runs["reduction"] = 1.0 - runs["layer_ratio"]
    # network compute per generated image: GMACs per call x sampler calls x passes per call (2 with guidance)
    runs["gmacs_per_image"] = runs["gflops"] * runs["steps"] * runs["passes_per_call"].fillna(1.0)
    runs["options"] = runs["method_options"].map(parse_options)
    runs["variant"] = [variant_label(m, o) for m, o in zip(runs["method"], runs["options"])]
    runs["group"] = runs[list(RUN_GROUP)].astype(str).agg("|".join, axis=1)
    runs["ts"] = pd.to_datetime(runs["timestamp"], errors="coerce", utc=True)
    if profile:
        runs = runs[runs["profile"] == profile]
    if experiment:
        runs = runs[runs["experiment"] == experiment]
    return Results(root=root, runs=runs.reset_index(drop=True))


def fmt_number(value, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{value:.{digits}f}"


def fmt_change(reduction) -> str:
    """A layer reduction of 0.833 as '-83%' (0 as '0%')."""
    if reduction is None or (isinstance(reduction, float) and math.isnan(reduction)):
        return "?"
    return "0%" if abs(reduction) < 0.005 else f"{-reduction * 100:+.0f}%"


def setting(row) -> str:
    """How a row ran: 'full depth', 'thr 0.5', or 'exit 6' for a fixed static exit (0-based block)."""
    thr = row["thr"]
    if thr is None or (isinstance(thr, float) and math.isnan(thr)):
        return "full depth"
    if row["method"] == "static" and row.get("variant") != "time schedule":
        return f"exit {fmt_threshold(thr)}"
    return f"thr {fmt_threshold(thr)}"


def fmt_threshold(value) -> str:
    """0.5 -> '0.5', 6.0 -> '6', NaN -> 'full'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "full"
    return f"{value:g}"
