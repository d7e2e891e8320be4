"""Which stored row fills a table cell: row specs, the dataset's protocol, the operating-point rule.

Rules (stated in every table's notes):

- A cell's candidates are the rows of its method (and variant, sampler, steps, backbone family) on
  its dataset. They are grouped into measurement runs (one trained model, one sampler setting, one
  sample count, one batch size: the rows of one `bench eval`).
- Runs are ranked: the dataset's protocol first (the sampler and step count that fill the most
  cells of the table; for a row that fixes its sampler, that sampler's most common step count), then
  the most samples, then runs that have FID, then the seed that fills the most cells (ties: the
  lowest), then the newest.
- In the best run that has what the cell needs, the row is: the full-depth row (threshold empty),
  the static exit at the paper's layer, or, for a dynamic method, the operating point.
- Operating point (`--operating-point`): `fid-tolerance:10%` (default) is the threshold with the
  largest layer reduction whose FID is at most 1.10 x the same run's full-depth FID; `max-reduction`;
  `threshold:0.1`; `target-reduction:45%` (the reduction closest to 45%). The full-depth FID is the
  run's threshold-empty row, else a row of the run whose layer ratio is 1 (nothing exited: the same
  images). Without FID, fid-tolerance falls back to max-reduction and the cell says so.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import pandas as pd

from bench.config import INFERENCE_METHOD_KEYS
from bench.report.load import ReportError, Results, fmt_threshold

# The methods' defaults for the options a table tells variants apart by (bench.yaml `methods:`); a row
# whose method_options lack a key (older CSVs) is taken to use the default.
# Static rows from before `weights` existed trained their own model.
OPTION_DEFAULTS = {"deediff": {"layerwise_loss": True, "shared_uem": False, "beta_ual": 1.0, "loss_form": "official",
                               "uem_target": "noise", **INFERENCE_METHOD_KEYS["deediff"]},
                   "calm": dict(INFERENCE_METHOD_KEYS["calm"]),
                   "static": {"schedule": "fixed", "weights": "own"}}
PAPER_DEPTH = 13  # U-ViT-S's blocks; the paper's static layers 7/9/11 are of these
PAPER_SAMPLER = {"cifar10": "euler_maruyama", "celeba": "euler_maruyama", "imagenet256": "dpm_solver",
                 "mscoco": "dpm_solver++"}
DDIM_BACKBONE = {"cifar10": "ddim_cifar10", "celeba": "ddim_celeba64"}


@dataclass(frozen=True)
class RowSpec:
    """One table row: which method/variant and which of its rows (full depth, operating point, a layer)."""

    label: str
    method: str
    point: str = "full"              # full | dynamic | layer | matched (fewer steps at DeeDiff's compute)
    options: tuple = ()              # ((key, value), ...) that method_options must hold
    sampler: str | None = None       # fixed sampler (else the dataset's protocol is preferred)
    steps: int | None = None         # fixed step count
    backbone: str = "uvit"           # backbone family (prefix of the backbone name)
    layer: int | None = None         # point == "layer": the paper's 1-based layer of 13
    paper: str | None = None         # key of the paper's numbers (bench/report/paper.py)

    def matches(self, runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
        keep = (runs["dataset"] == dataset) & (runs["method"] == self.method)
        keep &= runs["backbone"].str.startswith(self.backbone)
        if self.sampler:
            keep &= runs["sampler"] == self.sampler
        if self.steps:
            keep &= runs["steps"] == self.steps
        defaults = OPTION_DEFAULTS.get(self.method, {})
        # the exit rule (patience, CALM's comparison): a row that does not name it takes the default
        # one, so that a variant of the rule never mixes into it (the variant is a row of its own)
        named = {key for key, _ in self.options}
        rule = [(k, v) for k, v in INFERENCE_METHOD_KEYS.get(self.method, {}).items() if k not in named]
        for key, value in (*self.options, *rule):
            keep &= runs["options"].map(lambda o, k=key, v=value: o.get(k, defaults.get(k)) == v)
        return runs[keep]

    def _special_options(self) -> list[tuple]:
        """The options this row asks for that differ from the method's defaults."""
        defaults = OPTION_DEFAULTS.get(self.method, {})
        return [(k, v) for k, v in self.options if defaults.get(k, object()) != v]

    def describe(self, dataset: str) -> str:
        parts = [f"method={self.method}", f"dataset={dataset}", f"backbone={self.backbone}*"]
        parts += [f"{k}={v}" for k, v in self._special_options()]
        parts += [f"sampler={self.sampler}"] * bool(self.sampler) + [f"steps={self.steps}"] * bool(self.steps)
        return " ".join(parts)

    def command(self, dataset: str) -> str:
        """The command that makes the missing run."""
        verb = "run" if self.point == "full" else "sweep thresholds"
        cmd = [f"bench {verb} --method {self.method} --dataset {dataset}"]
        if self.backbone == "ddim":
            cmd.append(f"--backbone {DDIM_BACKBONE.get(dataset, 'ddim_tiny')}")
        if self.sampler:
            cmd.append(f"--sampler {self.sampler}")
        if self.steps:
            cmd.append(f"--steps {self.steps}")
        cmd += [f"--set method.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self._special_options()]
        if self.point == "layer":
            cmd.append("--set method.schedule=fixed")
        return " ".join(cmd)


@dataclass
class Pick:
    """The row chosen for a cell, or why there is none."""

    row: pd.Series | None = None
    reason: str = ""          # why the cell is empty
    note: str = ""            # how the row was chosen, when it is not the plain rule (fallbacks)
    run: pd.DataFrame | None = None  # the measurement run the row came from


# ---- operating point -----------------------------------------------------------------------------

@dataclass(frozen=True)
class OperatingPoint:
    """The rule that picks a dynamic method's row among its thresholds."""

    kind: str
    value: float | None = None

    KINDS = ("fid-tolerance", "max-reduction", "threshold", "target-reduction")

    @classmethod
    def parse(cls, text: str | None) -> "OperatingPoint":
        text = (text or "fid-tolerance:10%").strip()
        kind, _, arg = text.partition(":")
        if kind not in cls.KINDS:
            raise ReportError(f"unknown operating-point rule {text!r}; valid: fid-tolerance:10%, max-reduction, "
                              "threshold:0.1, target-reduction:45%")
        if kind == "max-reduction":
            if arg:
                raise ReportError("max-reduction takes no value")
            return cls(kind)
        if not arg:
            arg = "10%" if kind == "fid-tolerance" else ""
        if not re.fullmatch(r"-?\d+(\.\d*)?%?|-?\.\d+%?", arg):
            raise ReportError(f"operating-point rule {text!r}: {kind} needs a number, e.g. {kind}:"
                              + ("0.1" if kind == "threshold" else "10%"))
        value = float(arg.rstrip("%")) / (100 if arg.endswith("%") else 1)
        if kind != "threshold" and not 0 <= value <= (10 if kind == "fid-tolerance" else 1):
            raise ReportError(f"operating-point rule {text!r}: the value is out of range")
        return cls(kind, value)

    def __str__(self) -> str:
        if self.kind == "max-reduction":
            return self.kind
        if self.kind == "threshold":
            return f"threshold:{self.value:g}"
        return f"{self.kind}:{self.value * 100:g}%"

    def describe(self) -> str:
        if self.kind == "fid-tolerance":
            return (f"`{self}`: the threshold with the largest layer reduction whose FID is at most "
                    f"{1 + self.value:.2f} x the same run's full-depth FID (same checkpoint, sampler, steps, "
                    "samples, seed); where FID is missing, the largest reduction (marked)")
        if self.kind == "max-reduction":
            return "`max-reduction`: the threshold with the largest layer reduction, whatever its FID"
        if self.kind == "threshold":
            return f"`{self}`: the row measured at threshold {self.value:g}"
        return f"`{self}`: the threshold whose layer reduction is closest to {self.value * 100:g}%"

    def choose(self, run: pd.DataFrame) -> Pick:
        """The operating-point row of one measurement run (its threshold rows)."""
        rows = run[run["thr"].notna() & run["layer_ratio"].notna()]
        if rows.empty:
            return Pick(reason="only full-depth rows (no threshold measured)", run=run)
        tried = ", ".join(fmt_threshold(t) for t in sorted(rows["thr"]))
        if self.kind == "threshold":
            hit = rows[(rows["thr"] - self.value).abs() < 1e-9]
            if hit.empty:
                return Pick(reason=f"no row at threshold {self.value:g} (measured: {tried})", run=run)
            return Pick(row=hit.iloc[0], run=run)
        if self.kind == "target-reduction":
            order = rows.assign(_d=(rows["reduction"] - self.value).abs(), _f=rows["fid"].fillna(math.inf))
            return Pick(row=order.sort_values(["_d", "_f"]).iloc[0], run=run)
        if self.kind == "fid-tolerance":
            full = full_depth_fid(run)
            scored = rows[rows["fid"].notna()]
            if full is not None and not scored.empty:
                limit = (1 + self.value) * full
                ok = scored[scored["fid"] <= limit + 1e-9]
                if ok.empty:
                    best = scored.sort_values("fid").iloc[0]
                    return Pick(reason=f"no threshold within {self.value * 100:g}% of the full-depth FID "
                                       f"{full:.2f} (best: threshold {fmt_threshold(best['thr'])}, FID "
                                       f"{best['fid']:.2f})", run=run)
                return Pick(row=_most_reduced(ok), run=run)
            note = "no FID: largest reduction (fid-tolerance fallback)"
            return Pick(row=_most_reduced(rows), note=note, run=run)
        return Pick(row=_most_reduced(rows), run=run)


def _most_reduced(rows: pd.DataFrame) -> pd.Series:
    """Largest reduction; ties: lower FID, then the order the rows were stored in."""
    order = rows.assign(_f=rows["fid"].fillna(math.inf))
    return order.sort_values(["reduction", "_f"], ascending=[False, True], kind="stable").iloc[0]


def full_depth_fid(run: pd.DataFrame) -> float | None:
    """FID of the run at full depth: its threshold-empty row, else a row where nothing exited."""
    for rows in (run[run["thr"].isna()], run[(run["layer_ratio"] >= 1 - 1e-9)]):
        rows = rows[rows["fid"].notna()]
        if not rows.empty:
            return float(rows["fid"].iloc[0])
    return None


# ---- cells -----------------------------------------------------------------------------------------

def protocol(specs: list[RowSpec], runs: pd.DataFrame, dataset: str) -> tuple | None:
    """(sampler, steps, seed, steps_by_sampler) for the rows of one table on this dataset.

    - sampler, steps: the pair that fills the most rows (ties: the paper's sampler for the dataset, then
      more steps); rows that fix their own sampler or steps do not vote. None where no row votes.
    - seed: the one that fills the most rows (ties: the lowest), so that a table's rows come from one
      seed where they can, rather than a second seed's replicate standing in for some of them.
    - steps_by_sampler: for rows that fix their sampler but not their steps (Table 7), the step count
      that fills the most rows of that sampler (ties: more steps).
    """
    votes: dict[tuple[str, int], int] = {}
    per_sampler: dict[tuple[str, int], int] = {}
    seed_votes: dict[int, int] = {}
    for spec in specs:
        rows = spec.matches(runs, dataset)
        for seed in {int(v) for v in rows["seed"] if v == v}:
            seed_votes[seed] = seed_votes.get(seed, 0) + 1
        if spec.steps:
            continue
        pairs = {(s, int(n)) for s, n in zip(rows["sampler"], rows["steps"]) if n == n}
        for key in pairs:
            per_sampler[key] = per_sampler.get(key, 0) + 1
        if spec.sampler:
            continue
        for key in pairs:
            votes[key] = votes.get(key, 0) + 1
    seed = max(seed_votes, key=lambda k: (seed_votes[k], -k)) if seed_votes else None
    steps_by_sampler = {}
    for (name, steps), count in sorted(per_sampler.items(), key=lambda kv: (kv[1], kv[0][1])):
        steps_by_sampler[name] = steps  # ascending (count, steps): the last written wins
    if not votes and seed is None and not steps_by_sampler:
        return None
    sampler = steps = None
    if votes:
        preferred = PAPER_SAMPLER.get(dataset)
        sampler, steps = max(votes, key=lambda k: (votes[k], k[0] == preferred, k[1], k[0]))
    return sampler, steps, seed, steps_by_sampler


# The row a `matched` row is matched to: DeeDiff as the paper trains it, at its operating point; and
# what the matched baseline row must share with it besides the dataset.
SAME_AS_MATCHED = ("backbone", "profile", "experiment", "seed", "sampler", "sampler_options", "n_samples", "mode",
                   "fid_reference")
MATCHED_TO = RowSpec("DeeDiff", "deediff", "dynamic", options=(("layerwise_loss", True), ("shared_uem", False),
                                                               ("beta_ual", 1.0), ("loss_form", "official"),
                                                               ("uem_target", "noise")))


def pick_cell(results: Results, spec: RowSpec, dataset: str, rule: OperatingPoint,
              proto: tuple | None) -> Pick:
    """The row for (row spec, dataset), or a Pick whose reason says why there is none."""
    if spec.point == "matched":
        return _pick_matched(results, spec, dataset, rule, proto)
    rows = spec.matches(results.runs, dataset)
    if rows.empty:
        return Pick(reason=f"no run yet: {spec.describe(dataset)} (make it with `{spec.command(dataset)}`)")
    runs = [g for _, g in rows.groupby("group", sort=False)]
    runs.sort(key=lambda g: _rank(g, spec, proto), reverse=True)
    first = None
    for run in runs:
        pick = _pick_in_run(results, spec, run, rule)
        if pick.row is not None:
            return pick
        first = first or pick
    return Pick(reason=f"{first.reason}: {spec.describe(dataset)} (`{spec.command(dataset)}`)")


def _pick_matched(results: Results, spec: RowSpec, dataset: str, rule: OperatingPoint, proto) -> Pick:
    """The matched-compute baseline: the full-depth row of `spec`'s method, at any step count of the same
    sampler and sample count as DeeDiff's operating point, with the most GMACs per image that do not exceed
    DeeDiff's (fewer sampler steps save network compute too; the paper does not compare with them)."""
    target = pick_cell(results, MATCHED_TO, dataset, rule, proto)
    if target.row is None:
        return Pick(reason=f"no run yet: DeeDiff's operating point, whose compute this row matches ({target.reason})")
    budget = target.row["gmacs_per_image"]
    if budget != budget:
        return Pick(reason="DeeDiff's operating point has no GMACs (fvcore was not installed when it was measured)")
    rows = spec.matches(results.runs, dataset)
    rows = rows[rows["thr"].isna() & rows["fid"].notna()]
    for column in SAME_AS_MATCHED:  # comparable FIDs and costs: the same model family, protocol and reference
        rows = rows[rows[column].astype(str) == str(target.row[column])]
    command = (f"bench eval --method {spec.method} --dataset {dataset} --sampler {target.row['sampler']} --steps S "
               f"--samples {int(target.row['n_samples'])} --thresholds full")
    if rows.empty:
        return Pick(reason=f"no full-depth {spec.method} run with FID at fewer {target.row['sampler']} steps "
                           f"(make them with `{command}` for a few S)")
    within = rows[rows["gmacs_per_image"] <= budget * (1 + 1e-6)]
    if within.empty:
        return Pick(reason=f"every stored step count costs more than DeeDiff's {budget:.4g} GMACs per image "
                           f"(`{command}` with a smaller S)")
    row = within.sort_values(["gmacs_per_image", "ts"]).iloc[-1]
    return Pick(row=row, note=f"{int(row['steps'])} steps: {row['gmacs_per_image']:.4g} GMACs per image against "
                              f"DeeDiff's {budget:.4g}", run=within)


def _rank(run: pd.DataFrame, spec: RowSpec, proto) -> tuple:
    head = run.iloc[0]
    match = 0
    if proto:  # (sampler, steps) from a caller, or protocol()'s four entries
        if proto[0] is not None:
            match += (not spec.sampler) and head["sampler"] == proto[0]
        steps = proto[1] if not spec.sampler else (proto[3] if len(proto) > 3 else {}).get(spec.sampler)
        match += (not spec.steps) and steps is not None and head["steps"] == steps
    newest = run["ts"].max()
    seed = proto[2] if proto and len(proto) > 2 else None  # (sampler, steps) alone: no seed preference
    same_seed = seed is not None and head["seed"] == seed
    return (match, head["n_samples"] if head["n_samples"] == head["n_samples"] else -1,
            bool(run["fid"].notna().any()), same_seed, newest.value if not pd.isna(newest) else 0)


def _pick_in_run(results: Results, spec: RowSpec, run: pd.DataFrame, rule: OperatingPoint) -> Pick:
    if spec.point == "full":
        full = run[run["thr"].isna()]
        if full.empty:
            return Pick(reason="runs exist but none at full depth (threshold empty)", run=run)
        return Pick(row=full.sort_values("ts").iloc[-1], run=run)
    if spec.point == "dynamic":
        return rule.choose(run)
    if spec.point == "layer":
        blocks = model_blocks(results, run)
        exit_block = static_exit(spec.layer, blocks)
        hit = run[(run["thr"] - exit_block).abs() < 1e-9]
        if hit.empty:
            return Pick(reason=f"no row at exit block {exit_block} (layer {spec.layer} of {PAPER_DEPTH} scaled "
                               f"to {blocks} blocks)", run=run)
        return Pick(row=hit.iloc[0], note=f"exit block {exit_block} of {blocks}", run=run)
    raise ValueError(f"unknown row point {spec.point!r}")


def static_exit(layer: int, blocks: int) -> int:
    """The paper's 1-based layer L of 13 as a 0-based exit of a `blocks`-block model (methods/static.py's
    round_half_up(N L / 13) - 1, restated here because the report imports no model code)."""
    return int(math.floor(blocks * layer / PAPER_DEPTH + 0.5 + 1e-9)) - 1


def model_blocks(results: Results, run: pd.DataFrame) -> int:
    """Exits of the run's model: from the per-call histograms, else from a fixed-exit row, else 13."""
    for run_id in run["run_id"]:
        n = results.num_blocks(run_id)
        if n:
            return n
    fixed = run[run["thr"].notna() & (run["layer_ratio"] < 1)]
    if len(fixed) and run.iloc[0]["method"] == "static":
        r = fixed.iloc[0]
        return int(round((r["thr"] + 1) / r["layer_ratio"]))
    return PAPER_DEPTH
