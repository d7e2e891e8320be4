"""On-disk layouts of precomputed latents: written resumably and atomically, read as memory maps.

A layout is a folder whose ``meta.json`` is written last. It is built in ``<out>.partial/`` (with a
``progress.json`` that records how many items of each array are done, so an interrupted preparation
resumes where it stopped when it is run again with the same options) and renamed to ``<out>`` only
when complete. A folder without ``meta.json``, or a ``.partial`` folder, is never read as a dataset.

``meta.json`` holds what the data is (dataset, source, autoencoder and text encoder with their labels,
``random_init`` flags and weight fingerprints, the latent scale and shape, counts) and the sha256 of
every file (``files``; the reference image folder as one ``sources.checksum``). The dataset checksum
of a layout (``layout_checksum``) is a sha256 over those file hashes and the encoders' weight
fingerprints, so it changes whenever any file's content does (``verify_layout`` re-hashes the files).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from bench.errors import UserError

FORMAT = 1
META = "meta.json"
PROGRESS = "progress.json"
REFERENCE_DIR = "reference"


class LayoutError(UserError, ValueError):
    """A path that is not a finished layout of the expected dataset (or an inconsistent one)."""


def _atomic_text(path: Path, text: str) -> None:
    from bench.atomic import atomic_write

    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    _atomic_text(Path(path), json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.chmod(path, 0o644)  # readable like the .npy files (the temporary file was private)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def is_finished(path: str | os.PathLike) -> bool:
    p = Path(os.path.expanduser(os.fspath(path)))
    try:
        meta = json.loads((p / META).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("format") == FORMAT and meta.get("complete") is True


def interrupted_hint(p: Path) -> str:
    if p.with_name(p.name + ".partial").exists():
        return (f"; {p.name}.partial beside it is an interrupted preparation: run the same `bench prepare` "
                "command again to resume it")
    return ""


def read_meta(path: str | os.PathLike, dataset: str | None = None) -> dict:
    """meta.json of a finished layout; LayoutError where there is none or it is another dataset's."""
    p = Path(os.path.expanduser(os.fspath(path)))
    if not p.is_dir():
        raise LayoutError(f"{p} does not exist or is not a folder (a latent layout is a folder made by "
                          f"`bench prepare {dataset or '<dataset>'}`){interrupted_hint(p)}")
    if not is_finished(p):
        raise LayoutError(f"{p} is not a finished latent layout: no complete {META}{interrupted_hint(p)}")
    meta = json.loads((p / META).read_text())
    if dataset is not None and meta.get("dataset") != dataset:
        raise LayoutError(f"{p} holds a {meta.get('dataset')!r} layout, not {dataset!r}")
    return meta


def layout_checksum(path: str | os.PathLike) -> str:
    """sha256 over the layout's file hashes and the weight fingerprints of its encoders (as recorded in
    meta.json): equal for equal content, whenever and wherever it was prepared; different when any
    file, or the decoder that will turn samples back into images, differs."""
    meta = read_meta(path)
    key = {"files": meta["files"], "autoencoder": meta["autoencoder"]["fingerprint"],
           "text_encoder": meta.get("text_encoder", {}).get("fingerprint"), "scale": meta["scale"]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of each top-level file and of each sub-folder's files (nested files inside sub-folders
    other than the reference folder are hashed one by one), relative POSIX paths as keys."""
    from bench.data.sources import checksum

    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if rel in (META, PROGRESS) or rel.startswith(REFERENCE_DIR + "/"):
            continue
        if p.is_file():
            out[rel] = sha256_file(p)
    if (root / REFERENCE_DIR).is_dir():
        out[REFERENCE_DIR + "/"] = checksum(root / REFERENCE_DIR)
    return out


def verify_layout(path: str | os.PathLike) -> list[str]:
    """Files whose content no longer matches meta.json (empty: the layout is intact). Reads every byte."""
    p = Path(os.path.expanduser(os.fspath(path)))
    recorded = read_meta(p)["files"]
    now = file_hashes(p)
    return sorted(k for k in set(recorded) | set(now) if recorded.get(k) != now.get(k))


@contextmanager
def _locked(lock_path: Path):
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class LayoutWriter:
    """Build a layout in ``<out>.partial`` and move it to ``<out>`` when finished.

        with LayoutWriter(out, options) as w:
            if w.done: return out                    # already prepared with these options
            z = w.array("latents.npy", (n, 4, 32, 32), np.float16)
            for start in range(w.count("latents"), n, chunk):
                z[start:start + chunk] = ...
                w.commit("latents", start + chunk)   # flush, then record progress atomically
            w.finish(meta)

    One process at a time per ``out`` (an exclusive lock on ``.<name>.lock`` beside it); a second
    one waits, then finds the finished layout. ``options``: what must match for a resume (or for an
    existing layout to count as done); a partial folder made with other options is discarded.
    """

    def __init__(self, out: str | os.PathLike, options: dict, overwrite: bool = False):
        self.out = Path(os.path.expanduser(os.fspath(out))).absolute()
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.options = json.loads(json.dumps(options, sort_keys=True))
        self.overwrite, self.done = overwrite, False
        self._arrays: dict[str, np.memmap] = {}
        self._counts: dict[str, int] = {}
        self._lock = None

    def __enter__(self) -> "LayoutWriter":
        self._lock = _locked(self.out.with_name(f".{self.out.name}.lock"))
        self._lock.__enter__()
        try:
            self._start()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for arr in self._arrays.values():
            arr.flush()
        self._arrays.clear()
        self._lock.__exit__(*exc)

    def _start(self) -> None:
        if self.out.exists():
            if not is_finished(self.out):
                raise LayoutError(f"{self.out} exists and is not a finished latent layout; remove it or "
                                  "choose another output folder")
            same = json.loads((self.out / META).read_text()).get("options") == self.options
            if same and not self.overwrite:
                self.done = True
                return
            if not self.overwrite:
                raise LayoutError(f"{self.out} already holds a layout prepared with other options; pass "
                                  "overwrite=True (--overwrite) to replace it, or choose another folder")
        progress = self.partial / PROGRESS
        if self.partial.exists():
            try:
                saved = json.loads(progress.read_text())
            except (OSError, ValueError):
                saved = None
            if saved is not None and saved.get("options") == self.options:
                self._counts = {k: int(v) for k, v in saved.get("counts", {}).items()}
                return
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True)
        write_json(progress, {"options": self.options, "counts": {}})

    @property
    def resumed(self) -> bool:
        return bool(self._counts)

    def path(self, name: str) -> Path:
        p = self.partial / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def array(self, name: str, shape: tuple[int, ...], dtype) -> np.memmap:
        """A .npy file memory-mapped for writing (reopened as it is when resuming)."""
        p = self.path(name)
        dtype = np.dtype(dtype)
        if p.exists():
            arr = np.load(p, mmap_mode="r+")
            if arr.shape == tuple(shape) and arr.dtype == dtype:
                self._arrays[name] = arr
                return arr
            del arr
        arr = np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=tuple(shape))
        self._arrays[name] = arr
        return arr

    def count(self, key: str) -> int:
        """Items of ``key`` already done (0 for a fresh start)."""
        return self._counts.get(key, 0)

    def commit(self, key: str, n: int) -> None:
        """Flush every open array, then record that the first ``n`` items of ``key`` are done."""
        for arr in self._arrays.values():
            arr.flush()
        self._counts[key] = int(n)
        write_json(self.partial / PROGRESS, {"options": self.options, "counts": self._counts})

    def finish(self, meta: dict) -> Path:
        """Hash the files, write meta.json, move the folder into place (replacing an old layout)."""
        for arr in self._arrays.values():
            arr.flush()
        self._arrays.clear()
        meta = {**meta, "format": FORMAT, "complete": True, "options": self.options,
                "files": file_hashes(self.partial)}
        (self.partial / PROGRESS).unlink(missing_ok=True)
        write_json(self.partial / META, meta)
        old = None
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.replaced-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.partial, self.out)
        fd = os.open(self.out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.done = True
        return self.out


def open_array(path: Path, name: str) -> np.ndarray:
    """A layout's .npy array, memory-mapped read-only."""
    return np.load(path / name, mmap_mode="r")
