"""Files and folders that appear whole or not at all, and never through a planted link.

Every write goes to a fresh name made by `tempfile` (created with O_EXCL, so a symlink planted
under a fixed name cannot redirect it), is fsynced, then renamed over the target (a rename
replaces a symlink itself, never what it points to), and the folder is fsynced after, so the
rename survives a power cut too. A write that fails removes its temporary file. No torch here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

FILE_MODE, FOLDER_MODE = 0o644, 0o755  # tempfile makes 0600 / 0700; the targets are ordinary


def finite(data):
    """`data` with every NaN or infinity replaced by None, so that it is valid JSON."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite(value) for value in data]
    return data


def to_json(data, indent: int | None = 2) -> str:
    """JSON text that any parser reads: non-finite numbers become null."""
    return json.dumps(finite(data), indent=indent, allow_nan=False, default=str)


def write_error(e: Exception) -> str:
    """What went wrong in a failed write, in a few words: an OSError's text, or the I/O error
    inside a safetensors one ("Error while serializing: I/O error: No space left on device")."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return re.sub(r"^.*I/O error: |\s*\(os error \d+\)$", "", str(e)) or type(e).__name__


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data) -> None:
    write_bytes_atomic(path, (to_json(data) + "\n").encode())


@contextlib.contextmanager
def atomic_folder(final: Path, replace: bool = False):
    """A fresh hidden folder beside `final` to fill; when the block succeeds, everything in it and
    the folder are fsynced and it is renamed to `final`. `final` must be absent or empty, unless
    `replace`: then an existing `final` is set aside and deleted only once the new one is in its
    place. A failure (or Ctrl-C) removes the temporary folder and touches nothing else."""
    final = Path(final)
    temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial"))
    old = None
    try:
        yield temp
        for item in temp.rglob("*"):  # an imported run holds its checkpoint folder too
            if item.is_dir():
                fsync_dir(item)
            else:
                with open(item, "rb") as f:
                    os.fsync(f.fileno())
        os.chmod(temp, FOLDER_MODE)
        fsync_dir(temp)
        if replace and final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".old"))
            os.replace(final, old)
        os.replace(temp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)  # put the old copy back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(folder: Path, pattern: str) -> None:
    """Delete what writes killed mid-way left in `folder` (only its owner calls this, under the
    run's lock)."""
    for item in Path(folder).glob(pattern):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                item.unlink()
