"""File access for datasets: folders and zip archives behind one interface, paths, checksums.

A zip archive is opened lazily and once per process (keyed by ``os.getpid()``): a ``ZipFile`` opened
in the parent and then read from forked DataLoader workers shares one file offset between them and
fails with "Bad magic number for file header".
"""
from __future__ import annotations

import hashlib
import os
import re
import stat
import zipfile
from pathlib import Path

from bench.errors import DataError

IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Folder names that mean a split, in archives and folders alike (MNIST's PNG copy says training/testing).
SPLIT_ALIASES = {
    "train": ("train", "training"),
    "test": ("test", "testing"),
    "valid": ("valid", "val", "validation"),
}


def natural_key(text: str) -> tuple:
    """Sort key under which 'img9.png' comes before 'img10.png' (digit runs compare as numbers)."""
    # re.split with a group alternates text, digits, text, ...: positions never mix str and int.
    return tuple(int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", text)))


def is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.split("/"))


# ---------------------------------------------------------------------------------------------------
# Sources: a folder or a zip archive, as a list of relative POSIX paths and a read(name) -> bytes
# ---------------------------------------------------------------------------------------------------


class FolderSource:
    """The regular files below a folder (hidden files and folders skipped)."""

    kind = "folder"

    def __init__(self, root: str | os.PathLike):
        self.path = Path(root)

    def files(self) -> list[str]:
        out = []
        for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = os.path.relpath(dirpath, self.path)
            for f in filenames:
                if f.startswith("."):
                    continue
                rel = f if rel_dir == "." else f"{rel_dir}/{f}"
                out.append(rel.replace(os.sep, "/"))
        return sorted(out)

    def read(self, name: str) -> bytes:
        with open(self.path / name, "rb") as fh:
            return fh.read()

    def __repr__(self) -> str:
        return f"FolderSource({str(self.path)!r})"


class ZipSource:
    """The file members of a zip archive, opened lazily once per process."""

    kind = "zip"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._pid: int | None = None

    def archive(self) -> zipfile.ZipFile:
        pid = os.getpid()
        if self._zip is None or self._pid != pid:
            # A handle inherited through fork shares its file offset with the parent: never reuse it.
            try:
                self._zip, self._pid = zipfile.ZipFile(self.path), pid
            except zipfile.BadZipFile as err:
                raise DataError(f"{self.path} is not a readable zip archive ({err}); "
                                f"check the file or point data.path at the unpacked folder") from None
        return self._zip

    def files(self) -> list[str]:
        return sorted(
            info.filename
            for info in self.archive().infolist()
            if not info.is_dir() and not _hidden(info.filename)
        )

    def read(self, name: str) -> bytes:
        return self.archive().read(name)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = state["_pid"] = None  # spawn/forkserver workers open their own
        return state

    def __repr__(self) -> str:
        return f"ZipSource({str(self.path)!r})"


Source = FolderSource | ZipSource


def open_source(path: str | os.PathLike) -> Source:
    """A folder or a zip archive; anything else is a ValueError."""
    p = Path(path)
    if p.is_dir():
        return FolderSource(p)
    if p.is_file() and zipfile.is_zipfile(p):
        return ZipSource(p)
    raise DataError(f"{p} is neither a folder nor a zip archive")


# ---------------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------------


def _where(dataset: str) -> str:
    return f"bench.yaml `datasets.{dataset}.path` or `--dataset-path`"


def expand_path(path: str | os.PathLike, split: str | None = None) -> Path:
    """~ and $VARS expanded; a literal ``{split}`` replaced by the split (cifar10-{split}-jpg.zip)."""
    text = os.path.expandvars(os.path.expanduser(os.fspath(path)))
    if split is not None:
        text = text.replace("{split}", split)
    return Path(text)


def resolve_path(dataset: str, path: str | os.PathLike | None, split: str | None = None) -> Path:
    """The dataset's path, which must exist; FileNotFoundError says where the path comes from."""
    if path is None:
        raise FileNotFoundError(
            f"dataset {dataset!r} has no path: it comes from {_where(dataset)}"
        )
    p = expand_path(path, split)
    if not p.exists():
        raise FileNotFoundError(
            f"dataset {dataset!r}: {p} does not exist (the path comes from {_where(dataset)})"
        )
    return p


# ---------------------------------------------------------------------------------------------------
# Checksums
# ---------------------------------------------------------------------------------------------------

_CHECKSUMS: dict[tuple, str] = {}
_CHUNK = 1 << 20


def _hash_file(path: Path, h) -> None:
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)


def _folder_entries(root: Path) -> tuple[list[tuple[str, Path, int]], int]:
    """(relative POSIX path, path, size) of every regular file below root, and the newest mtime of
    any file or folder (a rename changes its folder's mtime)."""
    entries, newest = [], root.stat().st_mtime_ns
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        newest = max(newest, os.stat(dirpath).st_mtime_ns)
        for f in filenames:
            p = Path(dirpath, f)
            st = p.stat()
            if not stat.S_ISREG(st.st_mode):
                continue
            newest = max(newest, st.st_mtime_ns)
            entries.append((p.relative_to(root).as_posix(), p, st.st_size))
    entries.sort(key=lambda e: e[0])
    return entries, newest


def checksum(path: str | os.PathLike) -> str:
    """sha256 of a file; for a folder, sha256 over its files sorted by relative POSIX path (code-point
    order), each contributing ``path + NUL + size (8 bytes, big-endian) + bytes``. Every file counts,
    hidden ones too. Cached in memory by (path, size, mtime)."""
    p = Path(path).expanduser().resolve()
    if p.is_dir():
        entries, newest = _folder_entries(p)
        key = (str(p), "folder", len(entries), sum(e[2] for e in entries), newest)
    else:
        st = p.stat()
        key = (str(p), "file", st.st_size, st.st_mtime_ns)
    if key in _CHECKSUMS:
        return _CHECKSUMS[key]
    h = hashlib.sha256()
    if p.is_dir():
        for rel, file, size in entries:
            h.update(rel.encode("utf-8") + b"\0" + size.to_bytes(8, "big"))
            _hash_file(file, h)
    else:
        _hash_file(p, h)
    _CHECKSUMS[key] = digest = h.hexdigest()
    return digest
