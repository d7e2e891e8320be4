"""Figures 5, 6 and 7: what each method trades, compared on one sampler setting.

One PNG per (dataset, backbone, sampler, steps, sample count, batch size), since FID moves with the
sample count, seconds per image with the batch, and a method's curve is only comparable with the full model
of its own backbone: figure{N}-{dataset}-{backbone}-{sampler}{steps}-n{n}-b{batch}.png. Each figure draws one
seed, the one that fills the most of its runs (ties: the lowest), as the tables do; a second seed's
replicates are left out, and the report's list of what it could not make names them.

- Figure 5: FID against layer reduction, one curve per method (every stored threshold; full depth
  at 0%), the full model's FID as a dashed line; second panel: FID against measured seconds per image;
  third panel: FID against GMACs per generated image, with the full model sampled at fewer steps
  (every stored step count of the same sampler, samples and batch) as the matched-compute baseline:
  does exiting early beat simply taking fewer steps at the same cost? The methods at their defaults
  fill the top row; where DeeDiff's variants (ablations, loss forms, exit rules) are stored, a second
  row draws them beside default DeeDiff, so that neither row has more curves than colours.
- Figure 6: histograms of exit blocks (share of sample-calls that stop after each block), at each
  dynamic method's lowest and highest stored threshold (per_call.csv).
- Figure 7: error accumulation: MSE between each method's trajectory at its operating point and the
  full-depth trajectory from the same noise, per sampling step (trajectory.csv).
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.report import FIGURES
from bench.report.figures import CannotMake, FigureContext, caption, plt_and_sns, save, slug
from bench.report.load import dataset_name, fmt_change, method_name, setting

CURVE_METHODS = ("deediff", "bertxit", "calm", "static", "pruning")
DYNAMIC = ("deediff", "bertxit", "calm")
SETTING = ("dataset", "backbone", "sampler", "steps", "n_samples", "batch_size")


def _settings(ctx: FigureContext, methods) -> list[tuple[tuple, pd.DataFrame]]:
    """(setting, its rows of one seed) for every setting that has rows of these methods."""
    runs = ctx.results.runs
    runs = runs[runs["method"].isin(methods) | (runs["method"] == "baseline")]
    runs = runs[[ctx.wants(d) for d in runs["dataset"]]]
    out = []
    for key, rows in runs.groupby(list(SETTING), sort=True):
        if rows["method"].isin(methods).any():
            seed = _figure_seed(rows[rows["method"].isin(methods)])
            kept = rows[rows["seed"] == seed]
            left = sorted({f"{s:g}" for s in rows["seed"] if s != seed})
            if left:
                ctx.skipped.append(f"{_where(key)}: seed {seed:g} drawn; runs of seed {', '.join(left)} left out")
            out.append((key, kept))
    return out


def _figure_seed(rows: pd.DataFrame) -> float:
    """The seed with the most measurement runs (ties: the lowest), as the tables choose theirs."""
    counts = rows.drop_duplicates("group")["seed"].value_counts()
    return min(counts.index, key=lambda seed: (-counts[seed], seed))


def _where(key: tuple) -> str:
    dataset, backbone, sampler, steps, n, _ = key
    return f"{dataset_name(dataset)} {backbone} {sampler} {int(steps)} steps n={int(n)}"


def _path(ctx: FigureContext, number: str, key: tuple) -> Path:
    dataset, backbone, sampler, steps, n, batch = key
    name = slug(dataset, backbone, f"{sampler}{int(steps)}", f"n{int(n)}", f"b{int(batch)}")
    return ctx.out / f"figure{number}-{name}.png"


def _info(rows: pd.DataFrame) -> dict:
    head = rows.iloc[0]
    seeds = sorted({f"{s:g}" for s in rows["seed"]})
    profiles = sorted(set(rows["profile"]))
    return {"dataset": head["dataset"], "profile": ", ".join(profiles), "scale": ", ".join(sorted(set(rows["scale"]))),
            "backbone": ", ".join(sorted(set(rows["backbone"]))), "sampler": head["sampler"],
            "steps": int(head["steps"]), "n_samples": int(head["n_samples"]), "seed": ", ".join(seeds)}


def _labelled_runs(rows: pd.DataFrame, methods) -> list[tuple[str, pd.DataFrame]]:
    """Measurement runs of these methods, each with a legend label (variant, and hash when two share one)."""
    out = []
    for _, run in rows[rows["method"].isin(methods)].groupby("group", sort=False):
        head = run.iloc[0]
        label = method_name(head["method"], head["backbone"]) + (f" ({head['variant']})" if head["variant"] else "")
        out.append((label, run))
    counts = pd.Series([label for label, _ in out]).value_counts()
    return [(f"{label} [{run.iloc[0]['config_hash'][:6]} seed {run.iloc[0]['seed']:g}]" if counts[label] > 1
             else label, run) for label, run in out]


@FIGURES.register("5", help="FID against layer reduction and against seconds per image, one curve per method")
def figure_tradeoff(ctx: FigureContext) -> list[Path]:
    plt, sns = plt_and_sns()
    made, reasons = [], []
    for key, rows in _settings(ctx, CURVE_METHODS):
        curves = [(label, run[run["fid"].notna()]) for label, run in _labelled_runs(rows, CURVE_METHODS)]
        curves = [(label, run) for label, run in curves if not run.empty]
        if not curves:
            reasons.append(f"{_where(key)}: no FID in its rows (turn on eval.fid)")
            continue
        base = rows[(rows["method"] == "baseline") & rows["thr"].isna() & rows["fid"].notna()].sort_values("ts")
        fewer = _fewer_steps(ctx, key, seed=rows["seed"].iloc[0])
        panels = _panel_rows(curves)
        with sns.axes_style("whitegrid"):
            fig, grid = plt.subplots(len(panels), 3, figsize=(16, 4.6 * len(panels)), sharey=True, squeeze=False)
            for axes, (title, group) in zip(grid, panels):
                _draw_tradeoff_row(plt, sns, axes, group, base, fewer, key)
                axes[0].set_title(f"{title}: quality against layers saved", fontsize=10)
            if base.empty:
                ctx.skipped.append(f"{_where(key)}: no baseline row with FID, so no full-model line")
            fig.suptitle(f"Figure 5: FID against layer reduction, {dataset_name(key[0])}", fontsize=11)
        extra = "points: every stored threshold, full depth at 0%" + (
            "; dotted: the full model at fewer sampler steps" if not fewer.empty else
            "; no full-model rows at other step counts (matched-compute baseline: bench eval --method baseline "
            "--steps S)") + (
            "" if not base.empty else "; no baseline run with FID here, so no full-model line")
        made.append(save(fig, _path(ctx, "5", key), caption(_info(rows), extra)))
    return _done(ctx, made, reasons)


def _panel_rows(curves: list[tuple[str, pd.DataFrame]]) -> list[tuple[str, list]]:
    """The methods at their defaults; then, where any are stored, DeeDiff's variants beside default DeeDiff."""
    def is_deediff_variant(run):
        return run["method"].iloc[0] == "deediff" and bool(run["variant"].iloc[0])

    main = [(label, run) for label, run in curves if not is_deediff_variant(run)]
    variants = [(label, run) for label, run in curves if is_deediff_variant(run)]
    if not variants:
        return [("methods", main)]
    reference = [(label, run) for label, run in main if run["method"].iloc[0] == "deediff"]
    return [("methods", main), ("DeeDiff's variants", reference + variants)]


def _draw_tradeoff_row(plt, sns, axes, curves, base: pd.DataFrame, fewer: pd.DataFrame, key: tuple) -> None:
    """One row of Figure 5: FID against layer reduction, measured seconds and GMACs per image."""
    palette = dict(zip([label for label, _ in curves], sns.color_palette("tab10", len(curves))))
    for label, run in curves:
        run = run.sort_values("reduction")
        style = dict(color=palette[label], marker="o", ms=4, lw=1.4, label=label)
        axes[0].plot(run["reduction"] * 100, run["fid"], **style)
        by_time = run.sort_values("seconds_per_image")
        axes[1].plot(by_time["seconds_per_image"], by_time["fid"], **style)
        by_cost = run.sort_values("gmacs_per_image")
        axes[2].plot(by_cost["gmacs_per_image"], by_cost["fid"], **style)
    if not fewer.empty:
        axes[2].plot(fewer["gmacs_per_image"], fewer["fid"], color="0.3", marker="s", ms=4, lw=1.2, ls=":",
                     label=f"full model at fewer steps ({', '.join(str(int(n)) for n in fewer['steps'])})")
        for _, row in fewer.iterrows():
            axes[2].annotate(f"{int(row['steps'])}", (row["gmacs_per_image"], row["fid"]), fontsize=7,
                             xytext=(3, 3), textcoords="offset points", color="0.3")
    if not base.empty:
        newest = base.iloc[-1]
        for ax in axes:
            ax.axhline(newest["fid"], color="0.3", ls="--", lw=1.1,
                       label=f"full model ({method_name('baseline', newest['backbone'])}), FID {newest['fid']:.2f}")
    most = max(float(run["reduction"].max()) for _, run in curves) * 100
    axes[0].set_xlim(-2, max(most * 1.05 + 2, 10))
    axes[0].set_xlabel("layer reduction (% of blocks not run, mean per network call)")
    axes[0].set_ylabel(f"FID ({int(key[4])} samples; lower is better)")
    axes[1].set_xlabel(f"measured seconds per image (batch {int(key[5])})")
    axes[2].set_xlabel("GMACs per generated image (per call x sampler calls x passes)")
    axes[1].set_title("quality against measured time", fontsize=10)
    axes[2].set_title("quality against compute, with fewer sampler steps", fontsize=10)
    axes[2].legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))


def _fewer_steps(ctx: FigureContext, key: tuple, seed=None) -> pd.DataFrame:
    """The full model's full-depth rows with FID at every step count of this figure's backbone, sampler,
    samples and batch (the newest row per step count), cheapest first: the matched-compute baseline. With
    a seed, that seed's rows only (the figure's); the model is then that of the newest such row."""
    dataset, backbone, sampler, _, n, batch = key
    runs = ctx.results.runs
    keep = ((runs["method"] == "baseline") & (runs["dataset"] == dataset) & (runs["backbone"] == backbone)
            & (runs["sampler"] == sampler) & (runs["n_samples"] == n) & (runs["batch_size"] == batch)
            & runs["thr"].isna() & runs["fid"].notna() & runs["gmacs_per_image"].notna())
    if seed is not None:
        keep &= runs["seed"] == seed
    rows = runs[keep]
    if rows.empty:
        return rows
    # one model and protocol: those of the newest of these rows (FIDs against other references or sampler
    # options are not comparable)
    newest = rows.sort_values("ts").iloc[-1]
    for column in ("profile", "experiment", "sampler_options", "mode", "fid_reference", "config_hash"):
        rows = rows[rows[column].astype(str) == str(newest[column])]
    rows = rows.sort_values("ts").groupby("steps", as_index=False).tail(1)
    return rows.sort_values("gmacs_per_image")


@FIGURES.register("6", help="histograms of exit blocks at a low and a high threshold")
def figure_exit_histograms(ctx: FigureContext) -> list[Path]:
    plt, sns = plt_and_sns()
    per_call = ctx.results.side("per_call")
    if per_call.empty:
        raise CannotMake(f"no per_call.csv in {ctx.results.root} (`bench eval` writes it for every row)")
    made, reasons = [], []
    for key, rows in _settings(ctx, DYNAMIC):
        bars = []
        for label, run in _labelled_runs(rows, DYNAMIC):
            run = run[run["thr"].notna() & run["run_id"].isin(per_call["run_id"])]
            if run["thr"].nunique() < 2:
                continue
            for side, row in (("lowest", run.loc[run["thr"].idxmin()]), ("highest", run.loc[run["thr"].idxmax()])):
                calls = per_call[per_call["run_id"] == row["run_id"]]
                cols = [c for c in calls.columns if c.startswith("exits_block_") and calls[c].notna().any()]
                counts = calls[cols].astype(float).sum()
                for col, count in counts.items():
                    bars.append({"side": side, "block": int(col.rsplit("_", 1)[1]) + 1,
                                 "share": 100 * count / max(counts.sum(), 1),
                                 "method": f"{label}, {setting(row)} ({fmt_change(row['reduction'])} layers)"})
        if not bars:
            reasons.append(f"{_where(key)}: no dynamic method with two thresholds in per_call.csv")
            continue
        frame = pd.DataFrame(bars)
        with sns.axes_style("whitegrid"):
            fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharey=True)
            for ax, side in zip(axes, ("lowest", "highest")):
                part = frame[frame["side"] == side]
                sns.barplot(part, x="block", y="share", hue="method", ax=ax, palette="tab10")
                ax.set_title(f"{side} stored threshold of each method", fontsize=10)
                ax.set_xlabel("exit block (1 = first; the last = full depth)")
                ax.set_ylabel("share of sample-calls exiting there (%)")
                ax.legend(fontsize=7, title=None, loc="upper left")
            fig.suptitle(f"Figure 6: where samples exit, {dataset_name(key[0])}", fontsize=11)
        made.append(save(fig, _path(ctx, "6", key), caption(_info(rows), "summed over all network calls")))
    return _done(ctx, made, reasons)


@FIGURES.register("7", help="error accumulation along the trajectory against the full model")
def figure_error_accumulation(ctx: FigureContext) -> list[Path]:
    plt, sns = plt_and_sns()
    trajectory = ctx.results.side("trajectory")
    if trajectory.empty:
        raise CannotMake(f"no trajectory.csv in {ctx.results.root} (`bench eval` writes it for every row)")
    made, reasons = [], []
    methods = DYNAMIC + ("static",)
    for key, rows in _settings(ctx, methods):
        curves = []
        for label, run in _labelled_runs(rows, methods):
            pick = ctx.rule.choose(run[run["run_id"].isin(trajectory["run_id"]) | run["thr"].isna()])
            if pick.row is None or pd.isna(pick.row["thr"]):
                continue
            steps = trajectory[trajectory["run_id"] == pick.row["run_id"]].sort_values("step")
            note = " (no FID: max reduction)" if pick.note else ""
            curves.append((f"{label}: {setting(pick.row)}, {fmt_change(pick.row['reduction'])} layers{note}",
                           steps))
        if not curves:
            reasons.append(f"{_where(key)}: no early-exit run with trajectory.csv rows")
            continue
        with sns.axes_style("whitegrid"):
            fig, ax = plt.subplots(figsize=(8.5, 4.6))
            colors = sns.color_palette("tab10", len(curves))
            for color, (label, steps) in zip(colors, curves):
                ax.plot(steps["step"] + 1, steps["mse_vs_full"], marker="o", ms=3, lw=1.4, color=color, label=label)
            ax.axhline(0, color="0.3", ls="--", lw=1, label="full model (reference, 0)")
            top = max(float(steps["mse_vs_full"].max()) for _, steps in curves)
            ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)  # an MSE: nothing below 0
            ax.set_xlabel("sampler step (1 = first, from noise)")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.set_ylabel("MSE of x against the full-depth\ntrajectory from the same noise")
            ax.legend(fontsize=7.5, loc="upper left")
            ax.set_title(f"Figure 7: error accumulation along the trajectory, {dataset_name(key[0])}", fontsize=10)
        made.append(save(fig, _path(ctx, "7", key), caption(
            _info(rows), f"operating point {ctx.rule}; MSE over the first ≤16 samples")))
    return _done(ctx, made, reasons)


def _done(ctx: FigureContext, made: list[Path], reasons: list[str]) -> list[Path]:
    """The PNGs made; settings that could not be drawn go to the report's list (all of them: an error)."""
    if not made:
        raise CannotMake("; ".join(reasons) or "no rows of its methods in runs.csv for the chosen datasets")
    ctx.skipped += reasons
    return made


