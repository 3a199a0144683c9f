"""Files and folders that appear whole or not at all, and never through a planted link.

Every write goes to a fresh name made by `tempfile` (created with O_EXCL, so a symlink planted
under a fixed name cannot redirect it), is fsynced, then renamed over the target (a rename
replaces a symlink itself, never what it points to), and the folder is fsynced after, so the
rename survives a power cut too. A write that fails removes its temporary file. No torch here.

A temporary folder (atomic_folder) is locked by its writer for as long as it writes, and the OS
drops that lock with the process, even on kill -9: whatever process comes next removes the
folders whose lock it can take (remove_abandoned), never one that a live writer still fills.
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

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so no folder can be told abandoned
    fcntl = None

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
    place. A failure (or Ctrl-C) removes the temporary folder and touches nothing else; one that
    a kill -9 left beside `final` before is removed first."""
    final = Path(final)
    remove_abandoned(final.parent, final.name)
    temp, lock = _new_partial(final)
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
    finally:
        if lock is not None:
            os.close(lock)  # (after the rename: the lock goes with the folder, now `final`)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _new_partial(final: Path) -> tuple[Path, int | None]:
    """A fresh `.NAME.XXXXXXXX.partial` folder beside `final`, and the descriptor through which
    this process holds its lock until it closes it. A sweep that took the lock between the
    folder's making and ours has removed it (it removes only under the lock): then the folder
    is gone once we hold the lock, and another one is made."""
    while True:
        temp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=PARTIAL))
        if fcntl is None:
            return temp, None
        try:
            fd = os.open(temp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # a sweep holding it is removing it: wait, then look
            if os.path.samestat(os.fstat(fd), os.lstat(temp)):
                return temp, fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            shutil.rmtree(temp, ignore_errors=True)
            raise
        os.close(fd)


PARTIAL = ".partial"
# The name tempfile.mkdtemp gives atomic_folder's temporary folders: .NAME.XXXXXXXX.partial
RANDOM_PART = r"\.[a-z0-9_]+" + re.escape(PARTIAL)


def remove_abandoned(folder: Path, name: str | None = None) -> None:
    """Remove the temporary folders that atomic_folder made in `folder` (for `final` named
    `name`, or for any name) and that no live process writes any more: a write killed with
    kill -9 leaves one behind. Nothing else in `folder` is touched. Without advisory locks
    (Windows) a live writer's folder looks the same as a dead one's, so none is removed."""
    if fcntl is None:
        return
    named = re.escape(f".{name}") if name is not None else r"\..+"
    remove_leftovers(folder, f".*{PARTIAL}", named=named + RANDOM_PART)


def remove_leftovers(folder: Path, pattern: str, named: str | None = None) -> None:
    """Delete what writes killed mid-way left in `folder`: what the glob `pattern` matches, but
    never a temporary folder that a live process still writes (it holds the folder's lock, see
    atomic_folder). With `named`, a regular expression, only folders whose name it matches whole
    go. The checkpoint sweeps call this under the run's lock; remove_abandoned, from anywhere."""
    try:
        items = list(Path(folder).glob(pattern))
    except OSError:
        return
    for item in items:
        if named is not None and not re.fullmatch(named, item.name):
            continue
        if item.is_dir() and not item.is_symlink():
            _remove_unless_written(item)
        elif named is None:
            with contextlib.suppress(OSError):
                item.unlink()


def _remove_unless_written(folder: Path) -> None:
    """Delete `folder` unless a live process holds its lock. The lock is held while deleting, so a
    writer that made the folder just now waits, then finds it gone and makes another."""
    if fcntl is None:  # no locks to ask: only the run's owner sweeps, under the run's lock
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:  # gone meanwhile (renamed into place by its writer), or replaced by a link
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.lstat(folder)):
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:  # BlockingIOError: its writer lives; or the name moved on meanwhile
        pass
    finally:
        os.close(fd)
