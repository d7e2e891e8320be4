"""The paper's tables 1-7 as small declarative specs, and the builder that fills them from runs.csv.

A table has rows (RowSpec: method, variant, which of its rows) and column groups (one per dataset;
`--dataset` replaces the paper's datasets). Each group shows, per row: how the row was chosen (`run`:
full depth, the threshold, or the exit block, with a footnote letter for how it was obtained),
FID, the layer change, GMACs per network call and seconds per image; `--paper` adds the paper's
FID, layer change and GFLOPs as separate columns. An empty cell is "—" with a numbered reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd

from bench.report import TABLES
from bench.report.load import PROVENANCE, Results, dataset_name, is_standin, setting
from bench.report.paper import NOT_STATED, PAPER_NOTE, SUMMARIES, paper_numbers
from bench.report.select import OperatingPoint, Pick, RowSpec, model_blocks, pick_cell, protocol

METRICS = ("run", "FID", "Δlayers", "GMACs", "s/img")
PAPER_METRICS = ("paper FID", "paper Δlayers", "paper GFLOPs")
DASH = "—"
# DeeDiff as the harness trains it by default; other variants of the same method (beta of eq. 13, the
# paper's literal loss form) are rows of their own and never mix into these
DEFAULT = (("layerwise_loss", True), ("shared_uem", False), ("beta_ual", 1.0), ("loss_form", "official"),
           ("uem_target", "noise"))
EM, DPM = "euler_maruyama", "dpm_solver"
STATIC_OF_DEEDIFF = (("schedule", "fixed"), ("weights", "deediff"))  # Table 5: forced exits of the DeeDiff model


@dataclass(frozen=True)
class TableSpec:
    """One of the paper's tables: its rows and the datasets of its column groups."""

    number: str
    title: str
    datasets: tuple[str, ...]
    rows: tuple[RowSpec, ...]
    notes: tuple[str, ...] = ()


@dataclass
class TableData:
    """A filled table, ready to render: flat column headers grouped by dataset, text cells, notes."""

    number: str
    title: str
    groups: list[tuple[str, list[str]]]       # (dataset label, metric headers)
    rows: list[tuple[str, list[str]]]         # (row label, cells in group order)
    notes: list[str] = field(default_factory=list)
    filled: int = 0                            # (row, dataset) cells with a run
    total: int = 0
    missing: list[str] = field(default_factory=list)  # reasons, numbered in the notes


def _main_rows() -> tuple[RowSpec, ...]:
    return (RowSpec("U-ViT (full model)", "baseline", paper="uvit"),
            RowSpec("BERxiT", "bertxit", "dynamic", paper="bertxit"),
            RowSpec("CALM", "calm", "dynamic", paper="calm"),
            RowSpec("Static EE (time schedule, Moon et al.)", "static", "dynamic", options=(("schedule", "time"),),
                    paper="static"),
            RowSpec("DeeDiff without exiting", "deediff", options=DEFAULT, paper="deediff_full"),
            RowSpec("DeeDiff", "deediff", "dynamic", options=DEFAULT, paper="deediff"),
            RowSpec("U-ViT at fewer steps (DeeDiff's GMACs per image)", "baseline", "matched"),
            RowSpec("S-Pruning, 100 steps", "pruning", steps=100, paper="pruning100"),
            RowSpec("DeeDiff, 100 steps", "deediff", "dynamic", options=DEFAULT, steps=100, paper="deediff100"))


PRUNING_NOTE = ("S-Pruning removes channels, not layers: its saving shows in GMACs (REFERENCE.md lists the "
                "paper's -44% for it in the layer column).")
SPECS = [
    TableSpec("1", "CIFAR-10 and CelebA: quality and cost of each method", ("cifar10", "celeba"), _main_rows(),
              (PRUNING_NOTE,)),
    TableSpec("2", "ImageNet 256 and MS-COCO: quality and cost of each method", ("imagenet256", "mscoco"),
              _main_rows(), (PRUNING_NOTE,)),
    TableSpec("3", "Ablations of DeeDiff on CelebA", ("celeba",), (
        RowSpec("DeeDiff (Euler-Maruyama)", "deediff", "dynamic", options=DEFAULT, sampler=EM, paper="ablation_ref"),
        RowSpec("without the uncertainty-aware loss", "deediff", "dynamic", options=(("layerwise_loss", False),),
                sampler=EM, paper="ablation_no_ua"),
        RowSpec("with a shared estimation module", "deediff", "dynamic",
                options=(("layerwise_loss", True), ("shared_uem", True)), sampler=EM, paper="ablation_shared"),
        RowSpec("with DPM-Solver", "deediff", "dynamic", options=DEFAULT, sampler=DPM, paper="ablation_dpm"))),
    TableSpec("4", "A small 7-block model trained from scratch against DeeDiff", ("cifar10", "celeba"), (
        RowSpec("U-ViT (full model)", "baseline", paper="uvit"),
        RowSpec("Small model (7 blocks)", "small"),
        RowSpec("DeeDiff", "deediff", "dynamic", options=DEFAULT, paper="deediff")),
        ("Δlayers of the small model counts its blocks against the full backbone's (7 of 13: -46%).",)),
    TableSpec("5", "Static exits at layers 11, 9 and 7 against dynamic exit", ("cifar10", "celeba"), (
        RowSpec("Static exit, layer 11", "static", "layer", options=STATIC_OF_DEEDIFF, layer=11),
        RowSpec("Static exit, layer 9", "static", "layer", options=STATIC_OF_DEEDIFF, layer=9),
        RowSpec("Static exit, layer 7", "static", "layer", options=STATIC_OF_DEEDIFF, layer=7),
        RowSpec("DeeDiff (dynamic)", "deediff", "dynamic", options=DEFAULT, paper="deediff")),
        ("The paper's layer L of U-ViT-S's 13 blocks is exit round(N L / 13) - 1 of an N-block model "
         "(0-based; 13 blocks: exits 10, 8, 6).",)),
    TableSpec("6", "The DDIM U-Net at 50 and 100 DDIM steps, with and without early exit", ("cifar10", "celeba"),
              tuple(spec for steps in (50, 100) for spec in (
                  RowSpec(f"DDIM U-Net, {steps} steps", "baseline", sampler="ddim", steps=steps, backbone="ddim"),
                  RowSpec(f"DeeDiff without exiting, {steps} steps", "deediff", options=DEFAULT, sampler="ddim",
                          steps=steps, backbone="ddim"),
                  RowSpec(f"DeeDiff, {steps} steps", "deediff", "dynamic", options=DEFAULT, sampler="ddim",
                          steps=steps, backbone="ddim")))),
    TableSpec("7", "Samplers with and without early exit", ("cifar10", "celeba"),
              tuple(spec for sampler, name in ((EM, "Euler-Maruyama"), (DPM, "DPM-Solver")) for spec in (
                  RowSpec(f"{name}: U-ViT (full model)", "baseline", sampler=sampler),
                  RowSpec(f"{name}: DeeDiff", "deediff", "dynamic", options=DEFAULT, sampler=sampler)))),
]
for _spec in SPECS:
    TABLES.register(_spec.number, help=_spec.title)(_spec)


# ---- building ----------------------------------------------------------------------------------------

def build_table(spec: TableSpec, results: Results, rule: OperatingPoint, datasets: list[str] | None = None,
                paper: bool = False) -> TableData:
    """Fill `spec` from the results: one row per RowSpec, one column group per dataset."""
    datasets = list(datasets or spec.datasets)
    headers = list(METRICS) + (list(PAPER_METRICS) if paper else [])
    title = f"Table {spec.number}: {spec.title}"
    if datasets != list(spec.datasets):
        title += f" (here on {', '.join(map(dataset_name, datasets))}; the paper's: " \
                 f"{', '.join(map(dataset_name, spec.datasets))})"
    table = TableData(spec.number, title,
                      [(dataset_name(d), headers) for d in datasets], [])
    letters: dict[tuple, str] = {}
    picked: list[pd.Series] = []
    mixed_protocol, protos = [], {}
    for dataset in datasets:
        proto = protos[dataset] = protocol(list(spec.rows), results.runs, dataset)
        seen = {(r["sampler"], r["steps"]) for s in spec.rows if not (s.sampler or s.steps)
                for _, r in s.matches(results.runs, dataset).iterrows()}
        if len(seen) > 1:
            mixed_protocol.append(f"{dataset_name(dataset)}: runs with " + ", ".join(
                f"{s} {int(n)} steps" for s, n in sorted(seen)) + (f"; protocol {proto[0]} {proto[1]} steps"
                                                                    if proto and proto[0] else ""))
    for row_spec in spec.rows:
        cells: list[str] = []
        for dataset in datasets:
            pick = pick_cell(results, row_spec, dataset, rule, protos[dataset])
            table.total += 1
            if pick.row is None:
                cells += [f"{DASH} ({_reason(table, pick.reason)})"] + [DASH] * (len(METRICS) - 1)
            else:
                table.filled += 1
                picked.append(pick.row)
                cells += _measured_cells(results, table, row_spec, pick, letters)
            if paper:
                cells += _paper_cells(row_spec, dataset)
        table.rows.append((row_spec.label, cells))
    table.notes = _notes(spec, table, results, rule, datasets, letters, picked, mixed_protocol, paper)
    return table


def _measured_cells(results: Results, table: TableData, spec: RowSpec, pick: Pick, letters: dict) -> list[str]:
    row = pick.row
    signature = tuple(_clean(row[k]) for k in PROVENANCE)
    letter = letters.setdefault(signature, chr(ord("a") + len(letters)))
    run = f"{setting(row)} [{letter}]"
    if pick.note and spec.point == "dynamic":
        run += f" ({_reason(table, FALLBACK)})"
    if pick.note and spec.point == "matched":
        run += f" ({_reason(table, 'matched compute: ' + pick.note)})"

    def missing(why: str) -> str:
        return f"{DASH} ({_reason(table, why)})"

    fid = f"{row['fid']:.2f}" if _num(row["fid"]) else missing(
        "FID not computed in this run (eval.fid was off); re-run it with `--set eval.fid=true`")
    reduction = row["reduction"]
    if spec.method == "small" and _num(row["layer_ratio"]):
        own, full = model_blocks(results, pick.run), _reference_blocks(results, row)
        if own and full:
            reduction = 1 - row["layer_ratio"] * own / full
    layers = f"{-reduction * 100:+.1f}%" if _num(reduction) else DASH
    gmacs = f"{row['gflops']:.4g}" if _num(row["gflops"]) else missing(
        "no GMACs: fvcore was not installed when this run was measured")
    seconds = f"{row['seconds_per_image']:.4g}" if _num(row["seconds_per_image"]) else DASH
    return [run, fid, layers.replace("+0.0%", "0.0%").replace("-0.0%", "0.0%"), gmacs, seconds]


FALLBACK = ("operating point without FID: the threshold with the largest layer reduction (the fid-tolerance rule's "
            "fallback); its quality is not judged")


def _reason(table: TableData, text: str) -> int:
    """The footnote number of a reason (one number per distinct reason)."""
    if text not in table.missing:
        table.missing.append(text)
    return table.missing.index(text) + 1


def _paper_cells(spec: RowSpec, dataset: str) -> list[str]:
    numbers = paper_numbers(spec.paper, dataset)
    if not numbers:
        return [NOT_STATED] * len(PAPER_METRICS)
    fid = f"{numbers['fid']:g}" if "fid" in numbers else NOT_STATED
    red = numbers.get("reduction")
    layers = NOT_STATED if red is None else ("0%" if red == 0 else f"-{red * 100:.4g}%")
    gflops = f"{numbers['gflops']:g}" if "gflops" in numbers else NOT_STATED
    return [fid, layers, gflops]


def _reference_blocks(results: Results, row: pd.Series) -> int | None:
    """Blocks of the full backbone the small model is cut from (a non-small run on the same backbone)."""
    others = results.runs[(results.runs["backbone"] == row["backbone"]) & (results.runs["method"] != "small")]
    for run_id in others["run_id"]:
        n = results.num_blocks(run_id)
        if n:
            return n
    return None


def _notes(spec, table, results, rule, datasets, letters, picked, mixed_protocol, paper) -> list[str]:
    notes = [f"[{letter}] {_provenance_text(sig)}" for sig, letter in letters.items()]
    notes += [f"({i}) {reason}" for i, reason in enumerate(table.missing, 1)]
    if picked:
        frame = pd.DataFrame(picked)
        scales = sorted({_clean(s) for s in frame["scale"]})
        counts = sorted({int(n) for n in frame["n_samples"] if _num(n)})
        if len(scales) > 1 or len(counts) > 1:
            notes.append("Mixed: this table mixes " + " and ".join(
                part for part in (f"scales ({', '.join(scales)})" if len(scales) > 1 else "",
                                  f"sample counts ({', '.join(map(str, counts))})" if len(counts) > 1 else "")
                if part) + ". FIDs of different sample counts or scales are not comparable: compare cells with "
                           "the same footnote letter.")
    standin = [letter for sig, letter in letters.items() if "STAND-IN" in _provenance_text(sig)]
    if standin:
        notes.append(f"Stand-in data: the cells marked [{'], ['.join(standin)}] ran on a stand-in for the dataset "
                     "(see their footnotes); their numbers say nothing about the real dataset.")
    if mixed_protocol:
        notes.append("Mixed sampler settings within a dataset (rows that do not fix their own): "
                     + "; ".join(mixed_protocol) + ".")
    notes.append("Run choice: where several runs match a cell, the dataset's protocol (the sampler and step count "
                 "that fill the most cells; for rows that fix their sampler, that sampler's most common step "
                 "count) first, then the most samples, then runs with FID, then the seed that fills the most "
                 "cells, then the newest.")
    if any(r.point == "matched" for r in spec.rows):
        notes.append("Matched compute: the full model sampled with fewer steps of the same sampler, at the step "
                     "count whose GMACs per generated image (per call x calls) come closest to DeeDiff's operating "
                     "point without exceeding it; early exit is worth having only where it beats this row.")
    if any(r.point == "dynamic" for r in spec.rows):
        notes.append(f"Operating point of dynamic rows: {rule.describe()}.")
    notes.append("Δlayers: change in blocks run per network call (1 - layer ratio, mean over samples and calls). "
                 "GMACs: fvcore multiply-adds per network call of what ran (attention and exit modules counted; "
                 "the paper's GFLOPs are about 2x). s/img: measured seconds per image at the run's batch size.")
    notes += list(spec.notes)
    if paper:
        notes.append(PAPER_NOTE)
        if spec.number in SUMMARIES:
            notes.append(SUMMARIES[spec.number])
    if not table.filled:
        present = sorted(set(results.runs["dataset"]) - set(datasets))
        notes.append(f"No cell of this table has a run on {', '.join(map(dataset_name, datasets))}"
                     + (f"; runs.csv has rows for {', '.join(present)}: `bench report --table {spec.number} "
                        f"--dataset {','.join(present)}` shows this table for them." if present else "."))
    return notes


def _provenance_text(sig: tuple) -> str:
    p = dict(zip(PROVENANCE, sig))
    fid = (f"FID against {p['fid_n_reference']} reference images ({p['fid_reference']})"
           if p["fid_n_reference"] else "no FID")
    text = (f"{p['scale']} (profile {p['profile']}), {p['backbone']}, {p['n_samples']} samples, {p['sampler']} "
            f"{p['steps']} steps, seed {p['seed']}, batch {p['batch_size']}, {p['mode']}, "
            f"{p['train_steps']} training steps; {fid}")
    if p["autoencoder"]:
        text += f"; autoencoder {p['autoencoder']}"
    if is_standin(p["standin"]) or p["encoders_random_init"].lower() == "true":
        text += f"; STAND-IN data ({p['standin'] or 'random-init encoders'}), not the real dataset"
    return text


def _num(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _clean(value) -> str:
    """A provenance value as text: 4.0 -> '4', NaN -> ''."""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:g}"
    return str(value)
