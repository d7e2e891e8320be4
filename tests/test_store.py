"""The results store: atomic appends, cell de-duplication, growing headers, concurrent writers."""
import csv
import multiprocessing as mp

import pytest

from bench.store import CELL_KEY, append_row, has_cell, read_rows


def _row(seed=0, threshold=0.1, **extra):
    return {"experiment": "test", "method": "baseline", "backbone": "uvit_tiny", "dataset": "mnist",
            "profile": "tiny", "sampler": "dpm_solver", "steps": 25, "threshold": threshold, "seed": seed,
            "n_samples": 64, "batch_size": 64, "mode": "realised", "config_hash": "abc123", "fid": 12.5, **extra}


def _csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _leftovers(folder, csv_name="runs.csv"):
    """Files other than the CSV and its lock file (temporary files would show up here)."""
    return sorted(p.name for p in folder.iterdir() if p.name not in (csv_name, csv_name + ".lock"))


def test_append_writes_header_and_row(tmp_path):
    path = tmp_path / "sub" / "runs.csv"
    assert read_rows(path) == []
    assert append_row(path, _row(note=None)) is True
    rows = _csv(path)
    assert rows[0] == list(_row(note=None))
    assert set(CELL_KEY) <= set(rows[0])
    assert rows[1] == ["test", "baseline", "uvit_tiny", "mnist", "tiny", "dpm_solver", "25", "0.1", "0", "64",
                       "64", "realised", "abc123", "12.5", ""]
    assert len(rows) == 2
    assert has_cell(path, _row()) and not has_cell(path, _row(seed=1))
    assert _leftovers(path.parent) == []


def test_same_cell_is_skipped_unless_forced(tmp_path):
    path = tmp_path / "runs.csv"
    assert append_row(path, _row(fid=10.0))
    assert append_row(path, _row(fid=11.0)) is False  # same cell: nothing written
    assert [r["fid"] for r in read_rows(path)] == ["10.0"]
    assert append_row(path, _row(seed=1, fid=20.0))  # another cell
    assert append_row(path, _row(fid=11.0), force=True) is True  # replaces, does not duplicate
    rows = read_rows(path)
    assert len(rows) == 2
    assert sorted((r["seed"], r["fid"]) for r in rows) == [("0", "11.0"), ("1", "20.0")]
    # a cell is its CELL_KEY columns: other columns do not make a new cell
    assert append_row(path, _row(fid=99.0, seconds_per_image=3.0)) is False


def test_new_columns_extend_the_header(tmp_path):
    path = tmp_path / "runs.csv"
    append_row(path, _row(seed=0))
    append_row(path, _row(seed=1, kid=0.01, gflops=0.4))
    append_row(path, _row(seed=2))
    header, *body = _csv(path)
    assert header == [*_row(), "kid", "gflops"]
    assert all(len(r) == len(header) for r in body)
    rows = read_rows(path)
    assert [r["kid"] for r in rows] == ["", "0.01", ""]
    assert [r["gflops"] for r in rows] == ["", "0.4", ""]
    assert [r["seed"] for r in rows] == ["0", "1", "2"]  # order of arrival kept


def _writer(path, worker, n):
    for j in range(n):
        assert append_row(path, _row(seed=worker, threshold=j, worker=worker, note=f"w{worker} r{j},\"quoted\""))


def test_concurrent_writers_lose_no_rows(tmp_path):
    path = tmp_path / "runs.csv"
    ctx = mp.get_context("fork")
    workers = [ctx.Process(target=_writer, args=(path, w, 10)) for w in range(8)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in workers)
    rows = read_rows(path)
    assert len(rows) == 80
    assert sorted((int(r["seed"]), int(r["threshold"])) for r in rows) == [(w, j) for w in range(8) for j in range(10)]
    assert all(r["note"] == f"w{r['seed']} r{r['threshold']},\"quoted\"" for r in rows)
    header, *body = _csv(path)
    assert all(len(r) == len(header) for r in body)  # the CSV parses: no torn or interleaved lines
    # each writer's rows stay in the order it wrote them
    for w in range(8):
        assert [int(r["threshold"]) for r in rows if int(r["seed"]) == w] == list(range(10))
    assert _leftovers(tmp_path) == []


def test_a_cell_names_itself_once():
    import subprocess
    import sys

    from bench.cell import Cell, parse_run_id

    cfg = {"run": {"experiment": "e", "method": "deediff", "dataset": "mnist", "profile": "tiny", "seed": 3},
           "model": {"backbone": "uvit_tiny"},
           "sample": {"sampler": "dpm_solver", "steps": 25, "n_samples": 64, "batch_size": 32, "engine_mode": "realised",
                      "precision": "bf16"}}
    full = Cell.of(cfg, None, config_hash="abc123")
    cell = full.at(0.05)
    assert full.key["threshold"] == "" and cell.key["threshold"] == 0.05 and set(cell.key) == set(CELL_KEY)
    assert cell.run_id == "abc123-e-dpm_solver25-thr0.05-b32-n64-realised-bf16-seed3"
    assert parse_run_id(cell.run_id) == {"hash": "abc123", "experiment": "e", "sampler": "dpm_solver", "steps": "25",
                                         "thr": "0.05", "batch": "32", "n": "64", "mode": "realised-bf16", "seed": "3"}
    assert full.grid_path("res").as_posix() == \
        "res/grids/deediff-uvit_tiny-mnist-tiny-dpm_solver25-thrfull-seed3-realised-bf16-abc123.png"
    assert parse_run_id("not a run id") == {}
    # the reporters use it and know only the CSVs: no torch behind it
    probe = "import sys, bench.cell, bench.store; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", probe]).returncode == 0


def test_the_row_schema_is_declared_once():
    from bench.cell import OPTIONAL_COLUMNS, ROW_COLUMNS, ordered_row
    from bench.report.load import RUN_COLUMNS

    assert RUN_COLUMNS == ROW_COLUMNS and set(CELL_KEY) <= set(ROW_COLUMNS) and OPTIONAL_COLUMNS <= set(ROW_COLUMNS)
    full = {c: "" for c in ROW_COLUMNS if c not in OPTIONAL_COLUMNS}
    assert list(ordered_row(dict(reversed(list(full.items()))))) == list(full)  # put in schema order
    with pytest.raises(ValueError, match="missing.*'fid'"):
        ordered_row({k: v for k, v in full.items() if k != "fid"})
    with pytest.raises(ValueError, match="unknown.*'typo'"):
        ordered_row({**full, "typo": 1})
