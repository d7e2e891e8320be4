"""Bad input and injected faults: every mistake a clear error (exit 2, no traceback, the key or file
named, nothing written); every fault survived with nothing lost, duplicated or mislabelled.

Faults are injected at chosen points (an exception where a kill would land), so that the tests are
deterministic and fast.
"""
from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import bench.run as bench_run
from bench.atomic import atomic_write, remove_stale_temporaries
from bench.checkpoint import CheckpointError, checkpoint_dir, load_weights_into, resolve_checkpoint_path
from bench.cli import app
from bench.config import ConfigError, load_config, resolve
from bench.errors import ResultsError, RunBusyError, UserError
from bench.store import append_row, read_rows
from bench.train import TrainingDiverged, _run_lock, train
from methods import build_method

ASSET = resolve_checkpoint_path("builtin:uvit_tiny_mnist.pt")


def _invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _png(path: Path, value: int = 128) -> None:
    Image.fromarray(np.full((28, 28), value, dtype=np.uint8)).save(path)


def _fixtures(root: Path) -> dict[str, Path]:
    """Broken files and folders of every kind the campaign found."""
    f = {}
    f["empty_dir"] = root / "empty"
    f["empty_dir"].mkdir()
    f["text"] = root / "notes.txt"
    f["text"].write_text("not a dataset\n")
    f["zip_of_text"] = root / "text.zip"
    with zipfile.ZipFile(f["zip_of_text"], "w") as z:
        z.writestr("a/readme.txt", "hello")
    f["not_a_zip"] = root / "broken.zip"
    f["not_a_zip"].write_bytes(b"PK\x03\x04 this is not really a zip")
    f["one_image"] = root / "one"
    (f["one_image"] / "a").mkdir(parents=True)
    _png(f["one_image"] / "a" / "0.png")
    f["bad_png"] = root / "bad"
    (f["bad_png"] / "a").mkdir(parents=True)
    for i in range(4):
        _png(f["bad_png"] / "a" / f"{i}.png", 40 * i)
    (f["bad_png"] / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    f["truncated_ckpt"] = root / "truncated.pt"
    f["truncated_ckpt"].write_bytes(ASSET.read_bytes()[:5000])
    f["random_ckpt"] = root / "random.pt"
    f["random_ckpt"].write_bytes(os.urandom(4096))
    f["empty_ckpt"] = root / "empty.pt"
    f["empty_ckpt"].write_bytes(b"")
    f["pickle_ckpt"] = root / "evil.pt"
    f["marker"] = root / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {f['marker']}",))

    f["pickle_ckpt"].write_bytes(pickle.dumps(Evil()))  # loading it with pickle would run `touch`
    f["python_yaml"] = root / "evil.yaml"
    f["python_yaml"].write_text(f"run: !!python/object/apply:os.system ['touch {f['marker']}']\n")
    f["typed_yaml"] = root / "typed.yaml"
    f["typed_yaml"].write_text("profiles:\n  tiny: {}\nsample:\n  grid: maybe\n")
    f["nullable_yaml"] = root / "nullable.yaml"
    f["nullable_yaml"].write_text("profiles:\n  tiny: {}\nsample:\n  threshold: lots\n")
    return f


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    return _fixtures(tmp_path_factory.mktemp("broken"))


TINY = ["--samples", "4", "--steps", "2", "--set", "eval.fid=false", "--set", "train.steps=1",
        "--set", "model.kwargs={embed_dim: 32, num_heads: 2}", "--set", "model.init_from=null",
        "--set", "data.limit=64", "--set", "train.batch_size=8", "--set", "sample.batch_size=4"]

# (command and arguments, text the message must contain); {name} is a file of `broken`
BAD_INPUTS = [
    (["run", "--set", "sample.threshold=abc"], "sample.threshold"),
    (["run", "--set", "train.lr=.nan"], "train.lr"),
    (["run", "--set", "train.precision=fp8"], "train.precision"),
    (["run", "--set", "eval.loss_buckets=-1"], "eval.loss_buckets"),
    (["run", "--set", "sample.grid=maybe"], "sample.grid"),
    (["run", "--set", "sample.n_samples=1e12"], "sample.n_samples"),
    (["run", "--set", "sample.options={order: three}"], "sample.options.order"),
    (["run", "--set", "sample.options={orderr: 3}"], "sample.options.orderr"),
    (["run", "--set", "model.kwargs=[1, 2]"], "model.kwargs"),
    (["run", "--set", "model.kwargs={embed_dim: wide}"], "model.kwargs"),
    (["run", "--set", "data.limit=abc"], "data.limit"),
    (["run", "--set", "data.resolution=big"], "data.resolution"),
    (["run", "--set", "sample.engine_mode=fast"], "sample.engine_mode"),
    (["run", "--set", "train.steps=null"], "train.steps"),
    (["run", "--device", "foo"], "'foo'"),
    (["run", "--method", "deedif"], "Did you mean 'deediff'"),
    (["run", "--config", "{typed_yaml}"], "sample.grid"),
    (["run", "--config", "{nullable_yaml}"], "sample.threshold"),
    (["run", "--config", "{python_yaml}"], "not valid YAML"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{empty_dir}"], "empty"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{text}"], "notes.txt"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{zip_of_text}"], "text.zip"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{not_a_zip}"], "broken.zip"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{one_image}"], "train.batch_size"),
    (["run", "--dataset", "imagefolder", "--dataset-path", "{bad_png}", "--set", "train.batch_size=2"], "1.png"),
    (["run", "--set", "model.init_from={truncated_ckpt}"], "truncated.pt"),
    (["run", "--set", "model.init_from={random_ckpt}"], "random.pt"),
    (["run", "--set", "model.init_from={empty_ckpt}"], "empty.pt"),
    (["run", "--set", "model.init_from={pickle_ckpt}"], "evil.pt"),
    (["run", "--set", "model.init_from={empty_dir}"], "is a folder"),
    (["run", "--set", "model.init_from=builtin:uvit_tiny_mnist.pt"], "does not fit"),  # width 96 into 32
    (["eval", "--method", "deediff", "--thresholds", "5"], "outside the range"),
    (["eval", "--method", "deediff", "--thresholds", "nan"], "finite"),
    (["eval", "--method", "deediff", "--thresholds", "0.1,abc"], "'abc'"),
    (["eval", "--method", "deediff", "--thresholds", ","], "--thresholds is empty"),
    (["export", "{random_ckpt}", "{empty_dir}/out.pt"], "random.pt"),
]


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


@pytest.mark.parametrize("args, expected", BAD_INPUTS, ids=[" ".join(a)[:60] for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, monkeypatch, broken, args, expected):
    monkeypatch.chdir(tmp_path)
    args = [_fill(a, broken) for a in args]
    common = TINY if args[0] == "run" else []
    common += ["--results", tmp_path / "results"] if args[0] in ("run", "eval", "fid") else []
    common += ["--set", f"run.runs_dir={tmp_path / 'runs'}"] if args[0] in ("run", "eval") else []
    result, out = _invoke(args[0], *common, *args[1:])  # the case's own options last: they win
    assert result.exit_code == 2, out
    assert "error:" in out and "Traceback" not in out, out
    assert expected in out, out
    assert not (tmp_path / "results").exists()  # nothing measured, nothing stored
    assert not list((tmp_path / "runs").rglob("*.pt")) if (tmp_path / "runs").exists() else True
    assert not broken["marker"].exists()  # neither the pickle nor the YAML ran code


def test_fid_of_one_image_is_an_error_not_nan(tmp_path, broken):
    from bench.errors import DataError
    from bench.evaluate import fid_kid
    from bench.evaluate.fid import ReferenceStats

    ref = ReferenceStats(mu=np.zeros(2048), sigma=np.eye(2048), n=10, features=None, meta={})
    with pytest.raises(DataError, match="at least 2"):
        fid_kid(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), ref)


def test_a_real_bug_shows_its_traceback_and_asks_for_a_report(tmp_path, monkeypatch):
    def broken_run(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(bench_run, "run", broken_run)
    result, out = _invoke("run", *TINY, "--results", tmp_path / "results", "--set", f"run.runs_dir={tmp_path}")
    assert result.exit_code == 1
    assert "Traceback" in out and "ZeroDivisionError" in out and "please report it" in out


def test_disk_full_is_a_user_error_that_leaves_the_old_file(tmp_path):
    target = tmp_path / "runs.csv"
    target.write_text("old\n")

    def full(f):
        f.write(b"new")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="no space left"):
        atomic_write(target, full)
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.csv"]  # no temporary left behind


def test_stale_temporaries_of_dead_writers_are_removed_and_files_get_the_umask(tmp_path):
    target = tmp_path / "runs.csv"
    from bench.atomic import HOST

    dead = tmp_path / f".runs.csv.{HOST}-999999999.abcd.tmp"  # no such pid
    alive = tmp_path / f".runs.csv.{HOST}-{os.getpid()}.abcd.tmp"  # a writer still running (this process)
    elsewhere = tmp_path / ".runs.csv.otherhost-999999999.abcd.tmp"  # another host's writer: not ours to judge
    other_file = tmp_path / f".runs.csv.1.{HOST}-999999999.abcd.tmp"  # the temporary of runs.csv.1
    for tmp in (dead, alive, elsewhere, other_file):
        tmp.write_text("x")
    atomic_write(target, lambda f: f.write(b"a,b\n"))
    assert not dead.exists() and alive.exists() and elsewhere.exists() and other_file.exists()
    assert remove_stale_temporaries(target) == []
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's 0600


# ---- results files ------------------------------------------------------------------------

HEADER = "experiment,method,backbone,dataset,profile,sampler,steps,threshold,seed,n_samples,batch_size,mode,config_hash,fid\n"
ROW = "default,baseline,uvit_tiny,mnist,tiny,dpm_solver,25,,0,64,64,realised,abc,80.0\n"
CORRUPT = {
    "truncated row": HEADER + ROW + "default,baseline,uvit_tiny\n",
    "extra field": HEADER + ROW.replace("\n", ",1,2\n"),
    "missing key column": HEADER.replace("threshold,", "") + ROW.replace(",,0,", ",0,"),
    "a stray comma": HEADER + ROW.replace("tiny", "ti,ny", 1),
    "repeated column": HEADER.replace("fid", "seed") + ROW,
    "not text": HEADER + ROW + "\xff\xfe",
}


@pytest.mark.parametrize("kind", CORRUPT)
def test_a_corrupt_runs_csv_is_refused_and_left_as_it_was(tmp_path, kind):
    path = tmp_path / "runs.csv"
    path.write_bytes(CORRUPT[kind].encode("utf-8", "surrogateescape") if kind != "not text"
                     else (HEADER + ROW).encode() + b"\xff\xfe\n")
    before = path.read_bytes()
    row = dict(zip(HEADER.strip().split(","), ROW.strip().split(",")))
    with pytest.raises(ResultsError, match="runs.csv"):
        append_row(path, {**row, "seed": "1"})
    assert path.read_bytes() == before


@pytest.mark.parametrize("command", ["run", "report"])
def test_commands_refuse_a_corrupt_results_folder_before_working(tmp_path, command):
    results = tmp_path / "results"
    results.mkdir()
    (results / "runs.csv").write_text(CORRUPT["truncated row"])
    before = (results / "runs.csv").read_bytes()
    args = ["report", "--results", results] if command == "report" else \
        ["run", *TINY, "--results", results, "--set", f"run.runs_dir={tmp_path / 'runs'}"]
    result, out = _invoke(*args)
    assert result.exit_code == 2 and "line 3" in out and "Traceback" not in out, out
    assert (results / "runs.csv").read_bytes() == before
    assert not (tmp_path / "runs").exists()  # refused before training


# ---- checkpoints --------------------------------------------------------------------------

def _tiny_cfg(tmp_path, method="baseline", **overrides):
    base = {"model.kwargs": {"embed_dim": 32, "num_heads": 2}, "model.init_from": None, "data.limit": 64,
            "train.steps": 2, "train.batch_size": 8, "train.progress": False, "run.runs_dir": str(tmp_path / "runs"),
            "run.results": str(tmp_path / "results"), "sample.n_samples": 4, "sample.batch_size": 4,
            "sample.steps": 2, "eval.fid": False, "eval.layer_errors": False, "eval.loss_buckets": 0,
            "sample.grid": False}
    base.update(overrides)
    return resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": method}, overrides=base)


def test_a_checkpoint_of_another_configuration_is_refused(tmp_path):
    """The shipped baseline copied into a DeeDiff run folder: refused, naming both configurations."""
    cfg = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "deediff"},
                  overrides={"run.runs_dir": str(tmp_path / "runs")})
    folder = checkpoint_dir(cfg)
    folder.mkdir(parents=True)
    shutil.copy(ASSET, folder / "final.pt")
    result, out = _invoke("eval", "--method", "deediff", "--thresholds", "full", "--results", tmp_path / "results",
                          "--set", f"run.runs_dir={tmp_path / 'runs'}")
    assert result.exit_code == 2, out
    assert "belongs to another configuration" in out and "method baseline" in out and "method deediff" in out
    assert not (tmp_path / "results" / "runs.csv").exists()


def test_missing_method_weights_are_an_error_when_evaluating(tmp_path):
    cfg = resolve(load_config(), run={"profile": "tiny", "dataset": "mnist", "method": "deediff"})
    from bench.setup import build_model

    model = build_model(cfg, build_method("deediff", cfg["method"]))
    with pytest.raises(CheckpointError, match="no weights for this method's modules"):
        load_weights_into(model, ASSET, fresh_extras=False)
    assert load_weights_into(model, ASSET)  # a fine-tune from the baseline: the UEMs start fresh, as documented


def test_two_trainers_of_one_run_folder(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    folder = checkpoint_dir(cfg)
    folder.mkdir(parents=True)
    with _run_lock(folder):  # another `bench train` holds the folder
        with pytest.raises(RunBusyError, match="being trained by pid"):
            train(cfg)
    assert not (folder / "loss.csv").exists()
    assert train(cfg).name == "final.pt"  # once it is free, training goes ahead


def test_divergence_is_a_user_error():
    assert issubclass(TrainingDiverged, UserError) and issubclass(ConfigError, UserError)


# ---- a kill between a cell's files --------------------------------------------------------

class Killed(BaseException):
    """Stands in for kill -9 at a chosen point (BaseException: nothing in the harness catches it)."""


def test_a_kill_between_per_call_rows_and_the_runs_row_loses_nothing(tmp_path, monkeypatch):
    cfg = _tiny_cfg(tmp_path)
    checkpoint = train(cfg)
    results = Path(cfg["run"]["results"])
    import bench.store

    real_append_rows = bench.store.append_rows

    def killed_after_the_per_call_rows(path, rows, *args, **kwargs):
        if Path(path).name == "trajectory.csv":  # per_call.csv is written, the rest of the cell is not
            raise Killed()
        return real_append_rows(path, rows, *args, **kwargs)

    monkeypatch.setattr(bench.store, "append_rows", killed_after_the_per_call_rows)
    with pytest.raises(Killed):
        bench_run.measure(cfg, checkpoint, [None], progress=False)
    assert (results / "per_call.csv").exists()
    assert not (results / "runs.csv").exists()  # the cell is not stored, so a rerun measures it (whole)
    assert bench_run.skip_stored(cfg, [None]) == [None]
    monkeypatch.setattr(bench.store, "append_rows", real_append_rows)
    bench_run.measure(cfg, checkpoint, bench_run.skip_stored(cfg, [None]), progress=False)
    runs = read_rows(results / "runs.csv")
    assert len(runs) == 1
    calls = [r for r in read_rows(results / "per_call.csv") if r["run_id"] == runs[0]["run_id"]]
    steps = [r for r in read_rows(results / "trajectory.csv") if r["run_id"] == runs[0]["run_id"]]
    assert len(calls) == len({r["call"] for r in calls}) == cfg["sample"]["steps"]  # none lost, none twice
    assert steps and len(steps) == len({r["step"] for r in steps})
    assert bench_run.skip_stored(cfg, [None]) == []


def test_the_schema_names_only_keys_of_the_defaults_and_types_every_null_default():
    from bench.config import CHOICES, MAXIMUM, MINIMUM, NULLABLE_TYPES, SCHEMA_SECTIONS, load_defaults

    defaults = load_defaults()
    for table in (NULLABLE_TYPES, CHOICES, MINIMUM, MAXIMUM):
        for name in table:
            section, key = name.split(".")
            assert key in defaults[section], name
    nulls = {f"{s}.{k}" for s in SCHEMA_SECTIONS for k, v in defaults[s].items() if v is None}
    assert nulls == set(NULLABLE_TYPES)


def test_bench_yaml_values_are_typed_like_command_line_ones(tmp_path):
    (tmp_path / "bench.yaml").write_text("profiles:\n  tiny: {}\ntrain:\n  lr: 1\n  steps: 1.0e+3\n")
    cfg = resolve(load_config(tmp_path / "bench.yaml"))
    assert cfg["train"]["lr"] == 1  # a number where a float is expected (kept as written: hashes unchanged)
    assert cfg["train"]["steps"] == 1000 and isinstance(cfg["train"]["steps"], int)
    with pytest.raises(ConfigError, match="train.steps"):
        resolve(load_config(tmp_path / "bench.yaml"), overrides=["train.steps=2.5"])


def test_a_kill_while_a_checkpoint_is_written_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """Killed in the middle of writing the second last.pt: the first one is intact, and the resumed run
    ends with the weights of an uninterrupted one."""
    overrides = {"train.steps": 6, "train.ckpt_every": 2, "train.log_every": 1}
    cfg = _tiny_cfg(tmp_path / "a", **overrides)
    real_save, calls = torch.save, []

    def save_then_die(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"half a checkpoint")
            raise Killed()
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    with pytest.raises(Killed):
        train(cfg)
    monkeypatch.setattr(torch, "save", real_save)
    folder = checkpoint_dir(cfg)
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 2  # the previous checkpoint survived
    resumed = torch.load(train(cfg), weights_only=True)
    whole = torch.load(train(_tiny_cfg(tmp_path / "b", **overrides)), weights_only=True)
    for key, value in whole["ema"].items():
        assert torch.equal(value, resumed["ema"][key]), key
    steps = [line.split(",")[0] for line in (folder / "loss.csv").read_text().splitlines()[1:]]
    assert steps == [str(i) for i in range(1, 7)]  # each step logged once


def test_valid_inputs_that_the_checks_must_accept():
    """Regressions a review found: options passed on by dpm_solver++, a static exit beyond the tiny
    model's 13 blocks on U-ViT-L (21 blocks; the range is set by the backbone), fractional CPUs per trial."""
    resolve(load_config(), run={"profile": "paper", "dataset": "imagenet256", "method": "static"},
            overrides=["sample.threshold=14"])
    resolve(load_config(), overrides=["sample.sampler=dpm_solver++", "sample.options={method: multistep, order: 2}"])
    cfg = resolve(load_config(), overrides=["sweep.cpus_per_trial=0.5", "sample.options={order: 2.0}"])
    assert cfg["sweep"]["cpus_per_trial"] == 0.5
