"""A result cell: one measurement, a trained model at one operating point, sampled one way.

Everything that names a cell goes through `Cell`: its store key (the runs.csv columns that make a
row the same measurement), its run id (which keys the per-call, trajectory and analysis CSVs to
the row), the file name of its image grid, and reading a run id back. The module imports no torch,
so the reporters, which know only the CSVs, use it too.

    cell = Cell.of(cfg, threshold, config_hash=row_hash(cfg))
    cell.key          # {"experiment": ..., "threshold": "" for full depth, ...}
    cell.run_id       # "<hash>-<experiment>-<sampler><steps>-thr<t>-b<batch>-n<samples>-<mode>-seed<s>"
    cell.grid_path(results)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The key of a cell: a row with the same values in these columns is the same measurement.
CELL_KEY = ("experiment", "method", "backbone", "dataset", "profile", "sampler", "steps", "threshold", "seed",
            "n_samples", "batch_size", "mode", "config_hash")

RUN_ID = re.compile(r"^(?P<hash>[0-9a-f]+)-(?P<experiment>.+)-(?P<sampler>.+?)(?P<steps>\d+)-thr(?P<thr>[^-]+)"
                    r"-b(?P<batch>\d+)-n(?P<n>\d+)-(?P<mode>[a-z0-9-]+?)-seed(?P<seed>-?\d+)$")


# The columns of a runs.csv row, in order: bench.evaluate.measure writes them and the reporters
# (bench.report.load) read them. OPTIONAL_COLUMNS appear only where they apply: FID's details (FID on),
# the latent data and its encoders (latent datasets), the training time of a `bench run` call.
ROW_COLUMNS = (
    "experiment", "method", "backbone", "dataset", "profile", "scale", "sampler", "steps", "seed", "n_samples",
    "batch_size", "mode", "device", "train_steps", "exit_calibration_steps", "dataset_checksum", "data_limit",
    "config_hash", "checkpoint", "method_options", "sampler_options", "init_from", "condition", "guidance_scale",
    "guidance_exit", "passes_per_call", "autoencoder", "latent_scale", "text_encoder", "encoders_random_init",
    "standin", "threshold", "layer_ratio", "gflops", "gflops_convention", "seconds_per_image",
    "full_seconds_per_image", "measured_speedup", "theoretical_speedup", "grid", "fid", "kid", "kid_std",
    "fid_n_reference", "fid_method", "fid_reference", "train_seconds_this_call", "git_rev", "torch_version",
    "torch_fidelity_version", "timestamp", "run_id")
OPTIONAL_COLUMNS = frozenset({"autoencoder", "latent_scale", "text_encoder", "encoders_random_init", "standin",
                              "kid_std", "fid_n_reference", "fid_method", "fid_reference", "train_seconds_this_call"})


def ordered_row(values: dict) -> dict:
    """A runs.csv row in column order. A required column missing, or one outside the schema, is a bug in
    the harness: the schema is declared here, once."""
    missing = [c for c in ROW_COLUMNS if c not in values and c not in OPTIONAL_COLUMNS]
    unknown = [c for c in values if c not in ROW_COLUMNS]
    if missing or unknown:
        raise ValueError(f"a results row does not match bench.cell.ROW_COLUMNS: missing {missing}, unknown {unknown}")
    return {c: values[c] for c in ROW_COLUMNS if c in values}


def engine_label(sample: dict) -> str:
    """The `mode` column: the engine mode, plus the precision where it is not fp32 (realised-bf16), so that
    a bf16 cell is a cell of its own."""
    return sample["engine_mode"] + ("" if sample["precision"] == "fp32" else f"-{sample['precision']}")


@dataclass(frozen=True)
class Cell:
    """The coordinates of one measurement. `threshold` None is full depth; `config_hash` is the row's
    (bench.evaluate.measure.row_hash: the run's own, or with the weights' for a method that reads another's)."""
    experiment: str
    method: str
    backbone: str
    dataset: str
    profile: str
    sampler: str
    steps: int
    seed: int
    n_samples: int
    batch_size: int
    mode: str
    config_hash: str
    threshold: float | None = None

    @classmethod
    def of(cls, cfg: dict, threshold: float | None, *, config_hash: str) -> "Cell":
        r, s = cfg["run"], cfg["sample"]
        return cls(experiment=r["experiment"], method=r["method"], backbone=cfg["model"]["backbone"],
                   dataset=r["dataset"], profile=r["profile"], sampler=s["sampler"], steps=s["steps"], seed=r["seed"],
                   n_samples=s["n_samples"], batch_size=s["batch_size"], mode=engine_label(s),
                   config_hash=config_hash, threshold=threshold)

    def at(self, threshold: float | None) -> "Cell":
        """The same model and sampling at another operating point."""
        return Cell(**{**self.__dict__, "threshold": threshold})

    @property
    def threshold_text(self) -> str:
        return "full" if self.threshold is None else str(self.threshold)

    @property
    def key(self) -> dict:
        """The CELL_KEY columns as a row holds them (full depth: an empty threshold)."""
        values = {**self.__dict__, "threshold": "" if self.threshold is None else self.threshold}
        return {name: values[name] for name in CELL_KEY}

    @property
    def run_id(self) -> str:
        """Keys the per-call and per-step CSVs to this cell's row in runs.csv."""
        return (f"{self.config_hash}-{self.experiment}-{self.sampler}{self.steps}-thr{self.threshold_text}"
                f"-b{self.batch_size}-n{self.n_samples}-{self.mode}-seed{self.seed}")

    @property
    def grid_name(self) -> str:
        """The image grid's file stem; the config hash in it keeps variants of one method (ablations)
        from overwriting each other's grids."""
        return (f"{self.method}-{self.backbone}-{self.dataset}-{self.profile}-{self.sampler}{self.steps}"
                f"-thr{self.threshold_text}-seed{self.seed}-{self.mode}-{self.config_hash}")

    def grid_path(self, results: str | Path) -> Path:
        return Path(results) / "grids" / f"{self.grid_name}.png"


def parse_run_id(run_id: str) -> dict:
    """The parts of a run id (hash, experiment, sampler, steps, thr, batch, n, mode, seed); {} if it is none."""
    m = RUN_ID.match(str(run_id))
    return m.groupdict() if m else {}
