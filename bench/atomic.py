"""Atomic file writes: write a temporary file in the same folder, fsync, then rename over the target.

A killed process leaves either the old file or the new one, never a half-written one. Its temporary
file (`.<name>.<host>-<pid>.<random>.tmp`) is removed by the next write to the same target from the
same host once that pid is gone (a folder shared by several hosts keeps the others' temporaries). The
new file gets the permissions of an ordinary new file (the umask's), not mkstemp's 0600, so that a
shared results folder stays readable.
"""
from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Callable, IO

from bench.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it; done once, at import, before any threads exist
    os.umask(mask)
    return mask


UMASK = _read_umask()
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], binary: bool = True) -> Path:
    """Call write(f) on a temporary file next to `path`, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{HOST}-{os.getpid()}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"no space left on the device writing {path} ({err.strerror}); free some space or "
                            f"write elsewhere (--results, run.runs_dir). {path} was left as it was") from None
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete the temporary files of this host's writers of `path` that died (kill -9) before renaming."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{re.escape(HOST)}-(\d+)\.[^.]+\.tmp")
    removed = []
    for tmp in path.parent.glob(f".{path.name}.{HOST}-*.tmp"):
        match = pattern.fullmatch(tmp.name)
        if match and not _alive(int(match.group(1))):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:  # another writer removed it first
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
