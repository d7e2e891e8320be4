"""The results store: tidy CSV rows, written atomically, safe for concurrent writers.

Every write takes an exclusive lock on `<file>.lock`, reads the current rows, adds the new
one and replaces the file through a temporary file and a rename, so a killed process never
leaves a half-written row and concurrent writers (Ray trials) lose none.
"""
from __future__ import annotations

import csv
import fcntl
import io
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

from bench.atomic import atomic_write
from bench.cell import CELL_KEY
from bench.errors import ResultsError


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_rows(path: Path, required: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """The rows of a results CSV, checked: a header of distinct names (including `required` when the
    file has rows), and every row as many fields as the header. A damaged file raises ResultsError
    naming the file and line, and is left as it was."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = [(reader.line_num, row) for row in reader]
    except (csv.Error, UnicodeDecodeError) as err:
        raise ResultsError(f"{path} is damaged ({err}); repair or move it away, then run again") from None
    if header is None:
        return []
    if len(set(header)) != len(header) or any(not name.strip() for name in header):
        raise ResultsError(f"{path}: its header has empty or repeated column names; repair or move it away")
    missing = [name for name in required if name not in header]
    if missing and rows:
        raise ResultsError(f"{path} lacks the column(s) {', '.join(missing)} that identify a result; repair it or "
                           f"move it away")
    out = []
    for line, row in rows:
        if not row:
            continue
        if len(row) != len(header):
            raise ResultsError(f"{path}, line {line}: {len(row)} fields where the header has {len(header)} "
                               f"(a damaged or hand-edited row); repair or delete that line, then run again")
        out.append(dict(zip(header, row)))
    return out


def _cell(row: dict, key: tuple[str, ...] = CELL_KEY) -> tuple[str, ...]:
    return tuple("" if row.get(k) is None else str(row.get(k)) for k in key)


def has_cell(path: Path, row: dict) -> bool:
    """Whether a row for the same cell (CELL_KEY) is already stored."""
    return any(_cell(r) == _cell(row) for r in read_rows(path, CELL_KEY))


def append_row(path: Path, row: dict, force: bool = False, key: tuple[str, ...] = CELL_KEY) -> bool:
    """Add `row`; returns False (and writes nothing) when its cell is already there, unless forced.

    `key` names the columns that identify a cell; with force the stored row of that cell is replaced.
    """
    return append_rows(path, [row], force, key) == 1


def append_rows(path: Path, new_rows: list[dict], force: bool = False, key: tuple[str, ...] = CELL_KEY) -> int:
    """Add several rows in one locked, atomic rewrite; returns how many were added (see append_row)."""
    path = Path(path)
    with _locked(path):
        rows = read_rows(path, key)
        stored = {_cell(r, key) for r in rows}
        if force:
            replaced = {_cell(r, key) for r in new_rows}
            rows = [r for r in rows if _cell(r, key) not in replaced]
        else:
            new_rows = [r for r in new_rows if _cell(r, key) not in stored]
        if not new_rows:
            return 0
        columns = list(rows[0].keys()) if rows else []
        for row in new_rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in new_rows)
        atomic_write(path, lambda f: f.write(buffer.getvalue()), binary=False)
    return len(new_rows)


def provenance() -> dict[str, str]:
    """Versions and revision that every row carries."""
    import torch

    try:
        import torch_fidelity

        fidelity = torch_fidelity.__version__
    except ImportError:
        fidelity = ""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        rev = rev + ("-dirty" if rev and dirty else "")
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return {"git_rev": rev or "unknown", "torch_version": torch.__version__, "torch_fidelity_version": fidelity,
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
