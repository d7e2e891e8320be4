"""Figures 1, 3 and 4 (per trained model) and the helpers every figure shares.

- Figure 1: MSE of each exit's prediction against the final exit's along a full-depth trajectory
  (layer_mse.csv), one line per block.
- Figure 3: each exit's noise-prediction loss (L_simple) per tenth of diffusion time on training
  images (loss_per_timestep.csv), one line per block.
- Figure 4: DeeDiff's uncertainty maps at five calls along a trajectory (uncertainty/<run_id>.npz)
  beside the network inputs and the generated grid of the same model.

One PNG per model and sampler setting: figure{N}-{dataset}-{method}-{config hash}-{sampler}{steps}-n{n}.png.
Blocks are numbered from 1 in figures (the paper's layers); runs.csv's thresholds and exits are 0-based.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from bench.atomic import atomic_write
from bench.report import FIGURES
from bench.cell import parse_run_id
from bench.report.load import Results, dataset_name, method_name
from bench.report.select import OperatingPoint


class CannotMake(Exception):
    """A figure the CSVs do not allow; the message says why and which command makes the data."""


@dataclass
class FigureContext:
    results: Results
    out: Path
    rule: OperatingPoint
    datasets: list[str] | None = None
    skipped: list[str] = field(default_factory=list)  # parts left out of a made figure, and why

    def wants(self, dataset: str) -> bool:
        return not self.datasets or dataset in self.datasets


def plt_and_sns():
    """matplotlib on the Agg backend (no display) and seaborn, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    return plt, sns


def slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.+]+", "-", "-".join(str(p) for p in parts if p not in ("", None))).strip("-")


def caption(info: dict, extra: str = "") -> str:
    """The caption line: dataset, profile, sampler, steps, sample count (and what else matters)."""
    text = (f"dataset {dataset_name(info.get('dataset', '?'))} · profile {info.get('profile', '?')} "
            f"({info.get('scale', '?')}) · backbone {info.get('backbone', '?')} · sampler {info.get('sampler', '?')} "
            f"· {info.get('steps', '?')} steps · {info.get('n_samples', '?')} samples "
            f"· seed {info.get('seed', '?')}")
    return text + (f" · {extra}" if extra else "")


def save(fig, path: Path, caption_text: str) -> Path:
    """Caption under the axes, then an atomic PNG write."""
    plt, _ = plt_and_sns()
    fig.text(0.5, 0.005, caption_text, ha="center", va="bottom", fontsize=7.5, wrap=True, color="0.25")
    fig.tight_layout(rect=(0, 0.045, 1, 1))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130)
    plt.close(fig)
    return atomic_write(path, lambda f: f.write(buffer.getvalue()))


def model_info(results: Results, run_id: str) -> dict | None:
    """What a per-run file's run_id refers to: its run_id parts and the model's runs.csv row fields."""
    parts = parse_run_id(run_id)
    if not parts:
        return None
    rows = results.rows_for_hash(parts["hash"])
    if rows.empty:
        return None
    head = rows.iloc[0]
    return {"run_id": run_id, "config_hash": parts["hash"], "dataset": head["dataset"], "method": head["method"],
            "variant": head["variant"], "profile": head["profile"], "scale": head["scale"],
            "backbone": head["backbone"], "sampler": parts["sampler"], "steps": int(parts["steps"]),
            "n_samples": int(parts["n"]), "batch_size": int(parts["batch"]), "seed": parts["seed"],
            "experiment": parts["experiment"]}


def model_label(info: dict) -> str:
    name = method_name(info["method"], info["backbone"])
    return f"{name} ({info['variant']})" if info.get("variant") else name


def per_run_figure(ctx: FigureContext, number: str, frame: pd.DataFrame, draw, needs: str) -> list[Path]:
    """One PNG per run_id of `frame` (a per-run CSV), drawn by draw(fig_axes_factory, rows, info)."""
    if frame.empty:
        raise CannotMake(f"no {needs} in {ctx.results.root} ({_MAKERS[needs]})")
    made = []
    for run_id, rows in frame.groupby("run_id", sort=False):
        info = model_info(ctx.results, run_id)
        if info is None:
            ctx.skipped.append(f"{run_id}: no runs.csv row of its model")
            continue
        if not ctx.wants(info["dataset"]):
            continue
        name = slug(info["dataset"], info["method"], info["variant"], info["config_hash"],
                    f"{info['sampler']}{info['steps']}", f"n{info['n_samples']}")
        path = ctx.out / f"figure{number}-{name}.png"
        made.append(draw(path, rows, info))
    if not made:
        raise CannotMake(f"no {needs} for the chosen datasets/filters")
    return made


_MAKERS = {"layer_mse.csv": "`bench eval` writes it with eval.layer_errors on (the default)",
           "loss_per_timestep.csv": "`bench eval` writes it with eval.loss_buckets > 0 (the default)",
           "uncertainty maps": "`bench eval --method deediff` writes uncertainty/<run_id>.npz"}


def _exit_lines(ax, frame: pd.DataFrame, x, prefix: str, skip_last: bool) -> int:
    plt, _ = plt_and_sns()
    cols = [c for c in frame.columns if c.startswith(prefix) and frame[c].notna().any()]
    cols = sorted(cols, key=lambda c: int(c[len(prefix):]))
    if skip_last:
        cols = cols[:-1]  # the final exit against itself is 0
    colors = plt.cm.viridis(np.linspace(0, 0.95, max(len(cols), 1)))
    for color, col in zip(colors, cols):
        ax.plot(x, frame[col].astype(float), color=color, marker="o", ms=2.5, lw=1.2,
                label=f"block {int(col[len(prefix):]) + 1}")
    return len(cols)


def _log_scale(ax) -> bool:
    """A log y axis when the lines span more than a decade (positive values only), else linear."""
    values = np.concatenate([line.get_ydata() for line in ax.get_lines()]).astype(float)
    values = values[np.isfinite(values) & (values > 0)]
    if len(values) and values.max() / values.min() > 10:
        ax.set_yscale("log")
        return True
    return False


@FIGURES.register("1", help="MSE of each block's prediction against the final block's across sampling steps")
def figure_layer_mse(ctx: FigureContext) -> list[Path]:
    plt, sns = plt_and_sns()

    def draw(path, rows, info):
        rows = rows.sort_values("call")
        with sns.axes_style("whitegrid"):
            fig, ax = plt.subplots(figsize=(7.5, 4.6))
            n = _exit_lines(ax, rows, rows["call"] + 1, "mse_exit_", skip_last=True)
            log = _log_scale(ax)
            ax.set_xlabel("network call (sampling step; noise at 1, clean image at the last)")
            ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            ax.set_ylabel("MSE of the block's ε prediction\nagainst the final block's" + (" (log)" if log else ""))
            ax.set_title(f"Figure 1: each block's prediction against the final one, {model_label(info)} "
                         f"at full depth", fontsize=10)
            ax.legend(title="exit after", fontsize=7, title_fontsize=8, ncol=2 if n > 6 else 1,
                      loc="center left", bbox_to_anchor=(1.01, 0.5))
        return save(fig, path, caption(info, f"first ≤16 samples, {len(rows)} calls"))

    return per_run_figure(ctx, "1", ctx.results.side("layer_mse"), draw, "layer_mse.csv")


@FIGURES.register("3", help="each block's training loss (L_simple) per timestep bucket")
def figure_timestep_loss(ctx: FigureContext) -> list[Path]:
    plt, sns = plt_and_sns()

    def draw(path, rows, info):
        rows = rows.sort_values("bucket")
        mid = (rows["t_low"].astype(float) + rows["t_high"].astype(float)) / 2
        with sns.axes_style("whitegrid"):
            fig, ax = plt.subplots(figsize=(7.5, 4.6))
            n = _exit_lines(ax, rows, mid, "mse_exit_", skip_last=False)
            log = _log_scale(ax)
            ax.set_xlabel("diffusion time t (0 = clean, 1 = pure noise; bucket centres)")
            ax.set_ylabel("L_simple: MSE of ε prediction" + (" (log)" if log else ""))
            ax.set_title(f"Figure 3: loss per timestep at each exit, {model_label(info)}", fontsize=10)
            ax.legend(title="exit after", fontsize=7, title_fontsize=8, ncol=2 if n > 6 else 1,
                      loc="center left", bbox_to_anchor=(1.01, 0.5))
        images = int(rows["n_images"].iloc[0]) if "n_images" in rows else "?"
        return save(fig, path, caption(info, f"loss on {images} training images per bucket, "
                                             f"{len(rows)} buckets"))

    return per_run_figure(ctx, "3", ctx.results.side("loss_per_timestep"), draw, "loss_per_timestep.csv")


@FIGURES.register("4", help="uncertainty maps at several sampling steps beside the images")
def figure_uncertainty(ctx: FigureContext) -> list[Path]:
    folder = ctx.results.root / "uncertainty"
    files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    frame = pd.DataFrame({"run_id": [f.stem for f in files], "file": [str(f) for f in files]})
    return per_run_figure(ctx, "4", frame, lambda path, rows, info: _draw_uncertainty(ctx, path, rows, info),
                          "uncertainty maps")


def _draw_uncertainty(ctx: FigureContext, path: Path, rows: pd.DataFrame, info: dict) -> Path:
    plt, sns = plt_and_sns()
    data = np.load(rows["file"].iloc[0])
    maps = data["maps"].astype(np.float32)        # (calls, samples, exits, C, H, W)
    inputs = data["x_t"].astype(np.float32)       # (calls, samples, C, H, W)
    times = data["model_times"]
    calls = data["calls"] if "calls" in data.files else np.arange(len(times))
    n_calls, n_exits = maps.shape[0], maps.shape[2]
    exits = sorted({0, n_exits // 2, n_exits - 1})
    grid_path, grid_label = _grid_for(ctx.results, info)
    fig = plt.figure(figsize=(2.0 * n_calls + 4.2, 1.9 * (len(exits) + 1) + 0.8))
    spec = fig.add_gridspec(len(exits) + 1, n_calls + 2, width_ratios=[1] * n_calls + [0.08, 2.3])
    image = None
    for c in range(n_calls):
        ax = fig.add_subplot(spec[0, c])
        ax.imshow(_as_image(inputs[c, 0]), cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"call {int(calls[c]) + 1}\nt = {float(times[c]):.0f}", fontsize=8)
        _bare(ax, "input x_t" if c == 0 else "")
        for r, e in enumerate(exits, 1):
            ax = fig.add_subplot(spec[r, c])
            image = ax.imshow(maps[c, 0, e].mean(0), cmap="magma", vmin=0, vmax=1)
            _bare(ax, f"u, block {e + 1}" if c == 0 else "")
    bar = fig.colorbar(image, cax=fig.add_subplot(spec[1:, n_calls]))
    bar.set_label("estimated uncertainty u (0 to 1)", fontsize=8)
    ax = fig.add_subplot(spec[:, n_calls + 1])
    if grid_path is not None:
        ax.imshow(plt.imread(str(grid_path)), cmap="gray")
        ax.set_title(f"generated samples\n({grid_label})", fontsize=8)
    else:
        ax.text(0.5, 0.5, "grid image not found", ha="center", va="center")
        ctx.skipped.append(f"{info['run_id']}: no grid image of the model found")
    ax.axis("off")
    fig.suptitle(f"Figure 4: {model_label(info)}'s uncertainty maps along a full-depth trajectory (sample 1)",
                 fontsize=10)
    return save(fig, path, caption(info, f"blocks {', '.join(str(e + 1) for e in exits)} of {n_exits}"))


def _as_image(x: np.ndarray) -> np.ndarray:
    """(C, H, W) in about [-1, 1] -> an image in [0, 1] (gray for one channel)."""
    x = np.clip((x + 1) / 2, 0, 1)
    return x[0] if x.shape[0] == 1 else np.transpose(x[:3], (1, 2, 0))


def _bare(ax, ylabel: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=8)


def _grid_for(results: Results, info: dict) -> tuple[Path | None, str]:
    """The grid PNG of the same model and sampler setting: its full-depth row, else its nearest threshold."""
    rows = results.rows_for_hash(info["config_hash"])
    rows = rows[(rows["sampler"] == info["sampler"]) & (rows["steps"] == info["steps"])]
    rows = rows.assign(_full=rows["thr"].isna(), _n=(rows["n_samples"] == info["n_samples"]))
    for _, row in rows.sort_values(["_full", "_n", "layer_ratio"], ascending=False).iterrows():
        path = results.resolve(row["grid"])
        if path is not None:
            if row["_full"]:
                return path, "full depth"
            return path, f"threshold {row['thr']:g}, layer ratio {row['layer_ratio']:.2f}"
    return None, ""
