"""The `bench` command line: a thin typer layer over plain functions (heavy imports inside commands)."""
from __future__ import annotations

import errno
import functools
import inspect
import sys
import traceback
import typing
from dataclasses import dataclass
from typing import Optional

import click
import typer

app = typer.Typer(add_completion=False, no_args_is_help=False, invoke_without_command=True,
                  help="Benchmark and ablation harness for early-exit diffusion models.")

# Options several commands share, declared once (run_options injects them into a command).
CONFIG = typer.Option(None, "--config", help="bench.yaml to read (default: ./bench.yaml)")
PROFILE = typer.Option(None, "--profile", help="tiny | small | study | paper (bench ls profiles)")
DATASET = typer.Option(None, "--dataset", help="dataset name (bench ls datasets)")
DATASET_PATH = typer.Option(None, "--dataset-path", help="folder, zip or file of the dataset")
METHOD = typer.Option(None, "--method", help="method plugin (bench ls methods)")
BACKBONE = typer.Option(None, "--backbone", help="backbone size (bench ls backbones)")
SAMPLER = typer.Option(None, "--sampler", help="sampler (bench ls samplers)")
STEPS = typer.Option(None, "--steps", help="sampling steps (network evaluations)")
SAMPLES = typer.Option(None, "--samples", help="number of images to generate")
SEED = typer.Option(None, "--seed", help="run seed")
SET = typer.Option(None, "--set", help="override any config key: --set train.lr=1e-3 (repeatable)")
RESULTS = typer.Option(None, "--results", help="results directory (default: results)")
DEVICE = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N")
ADDRESS = typer.Option(None, "--address", help="join this Ray cluster (default: a private runtime on this machine)")
QUIET = typer.Option(False, "--quiet", help="no progress bars")
FORCE = typer.Option(False, "--force", help="re-measure cells that are already stored")
THRESHOLDS = typer.Option(None, "--thresholds", help="comma-separated; 'full' for full depth (default: the method's)")

# name, type, option; in the order --help lists them
RUN_OPTIONS = (("config", Optional[str], CONFIG), ("profile", Optional[str], PROFILE),
               ("dataset", Optional[str], DATASET), ("dataset_path", Optional[str], DATASET_PATH),
               ("method", Optional[str], METHOD), ("backbone", Optional[str], BACKBONE),
               ("sampler", Optional[str], SAMPLER), ("steps", Optional[int], STEPS),
               ("samples", Optional[int], SAMPLES), ("seed", Optional[int], SEED), ("sets", Optional[list[str]], SET),
               ("results", Optional[str], RESULTS), ("device", Optional[str], DEVICE))
SAMPLING_OPTIONS = ("sampler", "steps", "samples", "results")  # what training commands do not take


@dataclass
class RunOptions:
    """The shared options' values: the command line's layer of the configuration."""
    config: Optional[str] = None
    profile: Optional[str] = None
    dataset: Optional[str] = None
    dataset_path: Optional[str] = None
    method: Optional[str] = None
    backbone: Optional[str] = None
    sampler: Optional[str] = None
    steps: Optional[int] = None
    samples: Optional[int] = None
    seed: Optional[int] = None
    sets: Optional[list[str]] = None
    results: Optional[str] = None
    device: Optional[str] = None

    def layers(self) -> tuple[dict, list[str]]:
        """Run-section values and key=value overrides (the named options first, then --set)."""
        overrides = list(self.sets or [])
        for key, value in (("data.path", self.dataset_path), ("model.backbone", self.backbone),
                           ("sample.sampler", self.sampler), ("sample.steps", self.steps),
                           ("sample.n_samples", self.samples)):
            if value is not None:
                overrides.insert(0, f"{key}={value}")
        run = {"profile": self.profile, "dataset": self.dataset, "method": self.method, "seed": self.seed,
               "results": self.results, "device": self.device}
        return run, overrides

    def resolved(self) -> dict:
        from bench.config import load_config, resolve

        run, overrides = self.layers()
        return resolve(load_config(self.config), run=run, overrides=overrides)


def run_options(*, without: tuple[str, ...] = ()):
    """Give a command the shared options (all but `without`), collected into its `opts: RunOptions`
    parameter; typer reads the combined signature, so --help lists them all."""
    shared = [(name, kind, option) for name, kind, option in RUN_OPTIONS if name not in without]

    def decorate(command):
        signature = inspect.signature(command)
        own = [param for name, param in signature.parameters.items() if name != "opts"]
        hints = {name: kind for name, kind in typing.get_type_hints(command).items() if name != "opts"}

        @functools.wraps(command)
        def with_options(**kwargs):
            values = {name: kwargs.pop(name, None) for name, _, _ in shared}
            return command(opts=RunOptions(**values), **kwargs)

        with_options.__signature__ = signature.replace(parameters=[
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind)
            for name, kind, option in shared] + [param.replace(kind=inspect.Parameter.KEYWORD_ONLY) for param in own])
        with_options.__annotations__ = {**{name: kind for name, kind, _ in shared}, **hints}
        return with_options
    return decorate


def _fail(err: Exception | str, code: int = 2) -> None:
    typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=code)


def user_facing(command):
    """The error boundary of every command: a mistake the user can fix (bench.errors.UserError, a
    missing or unreadable file, a full disk) exits 2 with its message and no traceback; failed sweep
    trials exit 1; Ctrl-C exits 130; anything else is a bug, shown with its traceback."""
    @functools.wraps(command)
    def guarded(*args, **kwargs):
        from bench.errors import UserError
        from bench.sweep import SweepError

        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort, click.exceptions.ClickException):
            raise
        except UserError as err:
            _fail(err)
        except SweepError as err:
            _fail(err, code=1)
        except ConnectionError as err:  # a Ray cluster that cannot be reached (the message says where)
            _fail(err)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as err:
            _fail(err)
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _fail(f"no space left on the device{f' writing {err.filename}' if err.filename else ''} ({err.strerror}); "
                  f"free some space or point --results / run.runs_dir elsewhere. Files are written atomically, "
                  f"so nothing half-written was left; run the same command again to go on")
        except KeyboardInterrupt:
            typer.secho("\ninterrupted; run the same command again to resume (finished cells and checkpoints "
                        "are kept)", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(code=130)
        except Exception:
            traceback.print_exc()
            typer.secho("this is a bug in bench, not a problem with your input: please report it with the command "
                        "line and the traceback above", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=1)
    return guarded


@app.callback()
def main(ctx: typer.Context) -> None:
    """With no command, `bench` runs `bench run` on the embedded default (tiny MNIST baseline)."""
    if ctx.invoked_subcommand is None:
        ctx.invoke(run_command, force=False, quiet=False)


@app.command("run")
@user_facing
@run_options()
def run_command(opts: RunOptions, force: bool = FORCE, quiet: bool = QUIET) -> None:
    """Train (or reuse) a model, sample, save an image grid and a results row."""
    cfg = opts.resolved()
    from bench.run import run

    row = run(cfg, progress=not quiet, force=force)
    verb = "stored" if row.pop("stored") else "already stored (use --force to replace)"
    typer.echo(f"\nresults row ({verb} in {cfg['run']['results']}/runs.csv):")
    for key, value in row.items():
        typer.echo(f"  {key:24s} {value}")


@app.command("eval")
@user_facing
@run_options()
def eval_command(opts: RunOptions, thresholds: Optional[str] = THRESHOLDS, force: bool = FORCE,
                 quiet: bool = QUIET) -> None:
    """Evaluate a trained checkpoint at one or more thresholds (full depth measured first, same run)."""
    cfg = opts.resolved()
    from bench.evaluate.measure import measure, skip_stored
    from bench.run import default_threshold, finished_checkpoint
    from bench.thresholds import check_thresholds, parse_thresholds
    from methods import build_method

    from bench.setup import prepare_data

    prepare_data(cfg)
    method_plugin = build_method(cfg["run"]["method"], cfg["method"])
    wanted = [default_threshold(cfg, method_plugin)] if thresholds is None else parse_thresholds(thresholds)
    check_thresholds(cfg, method_plugin, wanted)
    checkpoint = finished_checkpoint(cfg)
    todo = wanted if force else skip_stored(cfg, wanted)
    if not todo:
        typer.echo("every requested cell is already stored (use --force to re-measure)")
        return
    rows = measure(cfg, checkpoint, todo, progress=not quiet, force=force)
    typer.echo(f"{'threshold':>10s} {'layers':>7s} {'GMACs':>8s} {'s/img':>9s} {'speedup':>8s} {'theory':>7s}")
    for row in rows:
        typer.echo(f"{str(row['threshold'] or 'full'):>10s} {row['layer_ratio']:7.3f} {row['gflops']:>8} "
                   f"{row['seconds_per_image']:9.4f} {row['measured_speedup']:8.2f} {row['theoretical_speedup']:>7}")


@app.command("train")
@user_facing
@run_options(without=SAMPLING_OPTIONS)
def train_command(opts: RunOptions, address: Optional[str] = ADDRESS, quiet: bool = QUIET) -> None:
    """Train (or resume) the configured model; prints the checkpoint path. With --set train.num_workers=N
    the steps run data-parallel on N Ray Train workers (--address: on that Ray cluster)."""
    cfg = opts.resolved()
    from bench.train import train

    path = train(cfg, progress=not quiet, address=address)
    typer.echo(str(path))


@app.command("config")
@user_facing
@run_options()
def config_command(opts: RunOptions, as_json: bool = typer.Option(False, "--json", help="JSON instead of YAML"),
                   section: Optional[str] = typer.Option(None, "--section", help="print only this section "
                                                         "(run, data, model, train, sample, eval, method, sweep)")) -> None:
    """Print the resolved configuration that run, eval and train would use with these options, its
    hash and where its checkpoint lives; runs nothing, writes nothing."""
    import json

    import yaml

    from bench.checkpoint import checkpoint_dir
    from bench.config import config_hash, inference_options
    from bench.errors import UserError
    from bench.train import weights_config

    cfg = opts.resolved()
    if section is not None and section not in cfg:
        raise UserError(f"no section {section!r}; valid: {', '.join(cfg)}")
    shown = cfg if section is None else {section: cfg[section]}
    typer.echo(json.dumps(shown, indent=1, default=str) if as_json else
               yaml.safe_dump(shown, sort_keys=False, default_flow_style=None, width=110).rstrip())
    source = weights_config(cfg)
    run_dir = checkpoint_dir(source)
    state = "trained" if (run_dir / "final.pt").exists() else \
        "partly trained (resumes)" if (run_dir / "last.pt").exists() else "not trained yet"
    reads = "" if source is cfg else f" (the {source['run']['method']} run's weights)"
    typer.echo(f"# config hash {config_hash(cfg)}; checkpoint {run_dir}/final.pt{reads}: {state}", err=as_json)
    from bench.evaluate.measure import row_hash

    if (rows := row_hash(cfg)) != config_hash(cfg):
        why = (f"the exit rule {rule} acts only when sampling: the same checkpoint"
               if (rule := inference_options(cfg)) else "they name the weights they measure too")
        typer.echo(f"# result rows carry config hash {rows} ({why})", err=as_json)


@app.command("export")
@user_facing
def export_command(checkpoint: str = typer.Argument(..., help="a training checkpoint (final.pt)"),
                   out: str = typer.Argument(..., help="file to write"),
                   full_precision: bool = typer.Option(False, "--fp32", help="keep float32 weights")) -> None:
    """Write a small inference checkpoint (EMA weights, config) for sharing or as model.init_from."""
    from bench.checkpoint import export_weights

    path = export_weights(checkpoint, out, half=not full_precision)
    typer.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")


@app.command("speed")
@user_facing
def speed_command(backbones: str = typer.Option("uvit_tiny", "--backbones", help="comma-separated sizes"),
                  batch_sizes: str = typer.Option("1,64", "--batch-sizes", help="comma-separated"),
                  img_size: int = typer.Option(28, "--img-size"), channels: int = typer.Option(1, "--channels"),
                  sets: Optional[list[str]] = typer.Option(None, "--set", help="backbone kwargs: embed_dim=64"),
                  repeats: int = typer.Option(5, "--repeats"), device: Optional[str] = DEVICE,
                  results: Optional[str] = RESULTS) -> None:
    """Benchmark training and sampling throughput (images/s); rows go to <results>/speed.csv."""
    from pathlib import Path

    from bench.config import parse_override
    from bench.speed import measure_throughput
    from bench.store import append_row, provenance

    kwargs = dict(parse_override(item) for item in sets or [])
    for name in backbones.split(","):
        for batch in (int(b) for b in batch_sizes.split(",")):
            row = measure_throughput(name, batch, img_size, channels, device or "auto", repeats, kwargs)
            row = {"experiment": "speed", **row, **provenance()}
            append_row(Path(results or "results") / "speed.csv", row, force=True,
                       key=("backbone", "kwargs", "img_size", "batch_size", "device", "threads"))
            typer.echo(f"{name:14s} batch {batch:4d}  train {row['train_images_per_s']:9.1f} img/s  "
                       f"forward {row['forward_images_per_s']:9.1f} img/s  ({row['params']:,} params)")


@app.command("perf")
@user_facing
def perf_command(batch_sizes: str = typer.Option("1,16,64", "--batch-sizes", help="comma-separated (128 too on a GPU)"),
                 steps: int = typer.Option(10, "--steps", help="DPM-Solver steps per timed sample"),
                 repeats: int = typer.Option(5, "--repeats", help="interleaved repeats per case"),
                 backbone: str = typer.Option("uvit_tiny", "--backbone"),
                 dataset: str = typer.Option("mnist", "--dataset", help="image geometry (mnist 28x28x1, cifar10 ...)"),
                 sets: Optional[list[str]] = typer.Option(None, "--set", help="backbone kwargs: embed_dim=64"),
                 init: Optional[str] = typer.Option(None, "--init", help="checkpoint for every model's backbone "
                                                    "(default: random weights)"),
                 precision: str = typer.Option("fp32", "--precision", help="fp32 | bf16 (autocast while sampling)"),
                 train_batch: int = typer.Option(64, "--train-batch", help="batch of the timed training steps (0: skip)"),
                 inception_images: int = typer.Option(64, "--inception-images", help="images for the FID "
                                                      "extractor's throughput (0: skip)"),
                 device: Optional[str] = DEVICE, results: Optional[str] = RESULTS) -> None:
    """Realised speed of early exit against full depth, training-step and FID-extractor cost, as ratios
    measured in one process; rows to <results>/perf.csv, figure <results>/perf.png (perf-<model>.png for
    another model or --init)."""
    from bench.config import ConfigError, parse_override
    from bench.perf import run_perf

    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {precision!r}")
    try:
        sizes = [int(b) for b in batch_sizes.split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--batch-sizes must be whole numbers like 1,16,64; got {batch_sizes!r}") from None
    if not sizes or min(sizes) < 1 or steps < 1 or repeats < 1:
        raise ConfigError("--batch-sizes, --steps and --repeats must be >= 1")
    kwargs = dict(parse_override(item) for item in sets or [])
    run_perf(sizes, steps=steps, repeats=repeats, backbone=backbone, dataset=dataset, kwargs=kwargs,
             device=device or "auto", init=init, precision=precision, train_batch=train_batch,
             inception_images=inception_images, results=results or "results", echo=typer.echo)


@app.command("fid")
@user_facing
def fid_command(dataset: str = typer.Option(..., "--dataset", help="reference dataset name"),
                dataset_path: Optional[str] = DATASET_PATH,
                images: Optional[str] = typer.Option(None, "--images", help="a folder of generated images"),
                split: str = typer.Option("test", "--split", help="split of the dataset images to score "
                                                                   "(when --images is not given)"),
                per_class: Optional[int] = typer.Option(None, "--per-class", help="first N of each class to score"),
                limit: Optional[int] = typer.Option(None, "--limit", help="first N images to score"),
                reference_split: str = typer.Option("train", "--reference-split"),
                reference_per_class: Optional[int] = typer.Option(None, "--reference-per-class"),
                reference_limit: Optional[int] = typer.Option(None, "--reference-limit"),
                resolution: Optional[int] = typer.Option(None, "--resolution"),
                device: Optional[str] = DEVICE, results: Optional[str] = RESULTS) -> None:
    """FID and KID of a folder of images, or of a dataset subset, against cached reference statistics."""
    import json
    import time
    from pathlib import Path

    from bench.evaluate import fid_kid, reference_dataset, reference_statistics
    from bench.setup import prepare_dataset, resolve_device
    from bench.store import append_row, provenance

    dev = resolve_device(device or "auto")
    prepare_dataset(dataset, dataset_path)
    tick = time.perf_counter()
    ref = reference_statistics(dataset, dataset_path, reference_split, resolution, limit=reference_limit,
                               per_class=reference_per_class, device=dev, progress=True)
    ref_seconds = time.perf_counter() - tick
    scored = images or reference_dataset(dataset, dataset_path, split, resolution, limit=limit, per_class=per_class)
    result = fid_kid(scored, ref, device=dev, progress=True)
    what = images or f"{dataset}:{split}:" + (f"per_class={per_class}" if per_class else f"limit={limit}")
    row = {"experiment": "fid", "scored": what, **result, "reference_seconds": round(ref_seconds, 1),
           "total_seconds": round(time.perf_counter() - tick, 1), "device": str(dev), **provenance()}
    append_row(Path(results or "results") / "fid.csv", row, force=True, key=("scored", "reference_split",
                                                                             "reference_subset", "reference_checksum"))
    typer.echo(json.dumps(row, indent=1, default=str))


@app.command("ls")
@user_facing
def ls_command(what: str = typer.Argument("all", help="methods | backbones | datasets | samplers | profiles")) -> None:
    """List what is registered, one line each."""
    from backbones import BACKBONES
    from bench.config import load_config
    from bench.data import DATASETS
    from bench.diffusion import SAMPLERS
    from methods import METHODS

    profiles = {name: p.get("description", "") for name, p in load_config()["profiles"].items()}
    tables = {"methods": METHODS.describe(), "backbones": BACKBONES.describe(), "datasets": DATASETS.describe(),
              "samplers": SAMPLERS.describe(), "profiles": profiles}
    if what != "all" and what not in tables:
        _fail(f"unknown list {what!r}; valid: {', '.join(tables)}")
    for name, table in tables.items():
        if what in ("all", name):
            typer.echo(f"{name}:")
            for key, text in table.items():
                typer.echo(f"  {key:22s} {text}")


@app.command("report")
@user_facing
def report_command(
        table: Optional[list[str]] = typer.Option(None, "--table", help="table number(s): 1-7, repeatable or 1,3"),
        figure: Optional[list[str]] = typer.Option(None, "--figure", help="figure number(s): 1,3,4,5,6,7"),
        everything: bool = typer.Option(False, "--all", help="every table and figure (the default with neither)"),
        results: Optional[str] = typer.Option(None, "--results", help="results directory to read (default: results)"),
        out: Optional[str] = typer.Option(None, "--out", help="where to write (default: <results>/reports)"),
        paper: bool = typer.Option(False, "--paper", help="add the paper's published numbers as separate columns"),
        operating_point: str = typer.Option(
            "fid-tolerance:10%", "--operating-point",
            help="row of a dynamic method: fid-tolerance:10% | max-reduction | threshold:0.1 | target-reduction:45%"),
        datasets: Optional[str] = typer.Option(
            None, "--dataset", help="comma-separated datasets: replace the tables' paper datasets, filter figures"),
        profile: Optional[str] = typer.Option(None, "--profile", help="only rows of this profile"),
        experiment: Optional[str] = typer.Option(None, "--experiment", help="only rows of this experiment")) -> None:
    """Tables (Markdown, LaTeX) and figures (PNG) of the paper from the results CSVs; lists what it could not make."""
    from bench.report import make_report

    make_report(results or "results", out, table, figure, everything, paper, operating_point,
                [d.strip() for d in datasets.split(",") if d.strip()] if datasets else None, profile, experiment,
                echo=typer.echo)


# ---- sweeps on Ray Tune (bench/sweep/) ---------------------------------------------------------

sweep_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Sweeps on Ray Tune, one trial per cell; the results store decides what is done.")
app.add_typer(sweep_app, name="sweep")

METHODS = typer.Option(None, "--methods", help="comma-separated methods (default: --method)")


@sweep_app.command("thresholds")
@user_facing
@run_options()
def sweep_thresholds_command(
        opts: RunOptions, methods: Optional[str] = METHODS,
        thresholds: Optional[str] = typer.Option(
            None, "--thresholds", help="comma-separated; 'full' for full depth (default: methods.<name>.thresholds "
                                       "in bench.yaml, else the method's own grid)"),
        address: Optional[str] = ADDRESS, force: bool = FORCE,
        quiet: bool = typer.Option(False, "--quiet", help="no Tune status tables")) -> None:
    """Evaluate trained checkpoints at every threshold of a grid, one Ray Tune trial per cell.

    Missing checkpoints are trained first, one trial per method.

    Cells already in <results>/runs.csv are skipped: run it again to do only what is missing.
    """
    from bench.sweep import parse_list, parse_thresholds, sweep_thresholds

    run, overrides = opts.layers()
    sweep_thresholds(opts.config, run, overrides, methods=parse_list(methods, "--methods") if methods else None,
                     thresholds=parse_thresholds(thresholds) if thresholds is not None else None,
                     address=address, force=force, quiet=quiet, echo=typer.echo)


@sweep_app.command("train")
@user_facing
@run_options(without=SAMPLING_OPTIONS)
def sweep_train_command(
        opts: RunOptions, methods: Optional[str] = METHODS,
        datasets: Optional[str] = typer.Option(None, "--datasets", help="comma-separated (default: --dataset)"),
        seeds: Optional[str] = typer.Option(None, "--seeds", help="comma-separated seeds (default: --seed)"),
        grid: Optional[list[str]] = typer.Option(
            None, "--grid", help="key=v1,v2 over any config key, applied after --set (repeatable: a product)"),
        address: Optional[str] = ADDRESS,
        quiet: bool = typer.Option(False, "--quiet", help="no Tune status tables")) -> None:
    """Train a grid of configurations (methods x datasets x seeds x --grid), one Ray Tune trial each.

    Configurations that already have a final checkpoint are skipped.
    """
    from bench.sweep import parse_grid, parse_list, parse_seeds, sweep_train

    run, overrides = opts.layers()
    sweep_train(opts.config, run, overrides, methods=parse_list(methods, "--methods") if methods else None,
                datasets=parse_list(datasets, "--datasets") if datasets else None,
                seeds=parse_seeds(seeds) if seeds else None, grid=parse_grid(grid), address=address,
                quiet=quiet, echo=typer.echo)



@app.command("prepare")
@user_facing
def prepare_command(dataset: str = typer.Argument(..., help="imagenet256 | mscoco"),
                    out: str = typer.Option(..., "--out", help="layout folder to write"),
                    source: Optional[str] = typer.Option(None, "--source",
                                                         help="ILSVRC2012 train/ folder, or the COCO 2014 folder"),
                    standin: bool = typer.Option(False, "--standin",
                                                 help="the embedded-MNIST stand-in with random-init encoders"),
                    autoencoder: Optional[str] = typer.Option(None, "--autoencoder",
                                                              help="random:tiny | local folder | hub id"),
                    text_encoder: Optional[str] = typer.Option(None, "--text-encoder",
                                                               help="random:tiny | local folder | hub id"),
                    scale: Optional[str] = typer.Option(None, "--scale", help="latent scale: a number or 'auto'"),
                    flip: bool = typer.Option(True, "--flip/--no-flip", help="also encode mirrored images (U-ViT)"),
                    per_class: Optional[int] = typer.Option(None, "--per-class"),
                    limit: Optional[int] = typer.Option(None, "--limit"),
                    val_limit: Optional[int] = typer.Option(None, "--val-limit"),
                    max_captions: Optional[int] = typer.Option(None, "--max-captions"),
                    reference_count: Optional[int] = typer.Option(None, "--reference-count", help="-1: all"),
                    n: Optional[int] = typer.Option(None, "--n", help="stand-in images"),
                    dtype: str = typer.Option("float16", "--dtype"),
                    batch_size: int = typer.Option(64, "--batch-size"),
                    num_workers: int = typer.Option(4, "--num-workers"),
                    device: Optional[str] = DEVICE,
                    overwrite: bool = typer.Option(False, "--overwrite")) -> None:
    """Encode ImageNet-256 or MS-COCO once into latents (and caption features), or make the stand-in."""
    from bench.latent.command import prepare_command as prepare

    path = prepare(dataset, out, source, standin=standin, autoencoder=autoencoder, text_encoder=text_encoder,
                   scale=scale, flip=flip, per_class=per_class, limit=limit, val_limit=val_limit,
                   max_captions=max_captions, reference_count=reference_count, n=n, dtype=dtype,
                   batch_size=batch_size, num_workers=num_workers, device=device or "auto", overwrite=overwrite)
    typer.echo(str(path))

if __name__ == "__main__":
    sys.exit(app())
