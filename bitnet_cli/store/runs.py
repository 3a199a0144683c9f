"""Where runs live, how they are named, and their state.json heartbeat. No torch here."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path

from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.store.files import atomic_folder, remove_abandoned, write_json_atomic

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

STATE_FILE, CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE = (
    "state.json", "config.json", "metrics.jsonl", "tokenizer.json")
CHECKPOINTS_FOLDER = "checkpoints"


def home() -> Path:
    """$BITNET_HOME, or the platform's user data folder for bitnet."""
    configured = os.environ.get("BITNET_HOME")
    if configured:
        path = Path(configured).expanduser()
    else:
        import platformdirs
        path = Path(platformdirs.user_data_dir("bitnet"))
    if path.exists() and not path.is_dir():
        raise BitnetError(f"BITNET_HOME {path} is a file, not a folder; point BITNET_HOME "
                          "(or --home) at a folder")
    if path.is_symlink() and not path.exists():  # a disk that is not mounted, a moved folder
        raise BitnetError(f"BITNET_HOME {path} is a link to {os.readlink(path)}, which does not "
                          "exist; create that folder, or point BITNET_HOME (or --home) elsewhere")
    return path


def runs_dir() -> Path:
    return home() / "runs"


@contextlib.contextmanager
def new_run_dir(experiment: str, size: str, name: str | None = None):
    """Yields (the path the new run will have, a temporary folder to fill). When the block
    succeeds the folder appears at that path whole, so no reader ever sees a half-made run and a
    crash leaves no run behind. Never reuses an existing run. What runs killed while being made
    (kill -9, a power cut) left in the runs folder is removed first (files.remove_abandoned)."""
    parent = runs_dir()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BitnetError(f"cannot create the runs folder {parent}: {e.strerror}") from None
    remove_abandoned(parent)
    base = name or f"{experiment}-{size}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    candidates = (parent / (base if n == 1 else f"{base}-{n}") for n in range(1, 1000))
    final = next((c for c in candidates if not os.path.lexists(c)), None)
    if final is None:
        raise BitnetError(f"too many runs named {base!r} in {parent}")
    if name and final.name != name:
        raise BitnetError(f"a run named {name!r} already exists in {parent}; choose another --name")
    try:
        with atomic_folder(final) as folder:
            yield final, folder
    except OSError as e:
        if os.path.lexists(final):
            raise BitnetError(f"a run named {final.name!r} was created in {parent} meanwhile; "
                              "choose another --name") from None
        raise BitnetError(f"cannot create the run folder {final}: {e.strerror or e}") from None


def read_json(path: Path) -> dict:
    """The JSON object in `path`. A missing file raises FileNotFoundError; one that cannot be
    read, is not JSON or holds something other than an object is a BitnetError naming it."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        raise
    except OSError as e:
        raise BitnetError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, RecursionError) as e:  # bad JSON, bad UTF-8, absurd nesting
        raise BitnetError(f"{path} is damaged (not valid JSON: {first_line(e, 80)}); restore it "
                          "or remove the run") from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean"}.get(type(data), "a number")
        raise BitnetError(f"{path} is damaged (it holds {'null' if data is None else kind}, not "
                          "a JSON object); restore it or remove the run")
    return data


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class StateFile:
    """state.json: what a run is doing right now, rewritten atomically as a heartbeat. Only the
    process holding the run's lock writes it; an unreadable one is started afresh."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STATE_FILE
        try:
            state = read_json(self.path)
        except (OSError, ValueError, BitnetError):
            state = {}
        self.state = state if isinstance(state, dict) else {}

    def update(self, **fields) -> None:
        self.state.update(fields, pid=os.getpid(), host=socket.gethostname(),
                          updated_at=now_iso(), updated_unix=time.time())
        write_json_atomic(self.path, self.state)


def list_run_dirs() -> list[Path]:
    """Every run folder (one holding config.json), oldest first. Hidden folders are a run
    being made or being removed, never a run."""
    parent = runs_dir()
    if not parent.is_dir():
        return []
    runs = [p for p in parent.iterdir()
            if not p.name.startswith(".") and (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=_created_key)


def _created_key(run_dir: Path):
    """When a run was created, as an instant: ISO times with different UTC offsets (a laptop
    that travelled, a shared folder) do not sort as strings. Unreadable ones sort first."""
    try:
        created = read_json(run_dir / CONFIG_FILE).get("created_at")
        instant = datetime.fromisoformat(created).astimezone().timestamp()
    except (OSError, BitnetError, TypeError, ValueError, OverflowError):
        instant = float("-inf")
    return (instant, run_dir.name)


def remove_run(run_dir: Path) -> str:
    """Delete a run folder that exact_run chose; a run being trained is refused. The folder is
    first renamed to a hidden name, so an interrupted removal never leaves half a run that lists
    as one. Returns what was removed."""
    run_dir = Path(run_dir)
    with run_lock(run_dir):  # held while the folder moves: no trainer can start on it
        gone = run_dir.with_name(f".{run_dir.name}.removing-{os.getpid()}")
        os.rename(run_dir, gone)
    shutil.rmtree(gone)
    return str(run_dir)


# One writer per run: the trainer holds an exclusive flock on the run folder itself. There is
# no lock file to plant a link in, and nothing stale after a crash: the OS drops the lock with
# the process. A run on another machine (a shared folder) is judged by its heartbeat instead.
STALE_AFTER_S = 15 * 60
_held: dict[Path, int] = {}  # run folders this process holds the lock of -> its descriptor


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run's lock for the block (re-entrant within this process); a run that another
    process trains is one line."""
    key = Path(run_dir).resolve()
    if key in _held or fcntl is None:  # held already, or no advisory locks (Windows)
        yield
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BitnetError(f"run {key.name} is being trained by another process{_who(key)}; "
                          f"watch it with `bitnet status --watch {key.name}`, or stop it "
                          "first") from None
    _held[key] = fd
    try:
        yield
    finally:
        del _held[key]
        os.close(fd)


def _who(run_dir: Path) -> str:
    try:
        state = read_json(run_dir / STATE_FILE)
        return f" (pid {int(state['pid'])} on {state['host']})"
    except Exception:  # noqa: BLE001 - it only decorates the message
        return ""


def is_locked(run_dir: Path) -> bool:
    """Whether some process (this one included) holds the run's lock."""
    key = Path(run_dir).resolve()
    if key in _held:
        return True
    if fcntl is None:
        return False
    try:
        fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def on_other_host(state: dict) -> bool:
    host = state.get("host")
    return isinstance(host, str) and host != socket.gethostname()


def heartbeat_fresh(state: dict) -> bool:
    updated = state.get("updated_unix")
    return isinstance(updated, (int, float)) and time.time() - updated < STALE_AFTER_S


def run_status(state: dict, run_dir: Path | None = None) -> str:
    """The status to show: state.json's, except that a 'running' run whose lock nobody holds
    is 'crashed' (killed, out of memory, power loss), and one on another machine whose
    heartbeat stopped is 'stale'."""
    status = state.get("status", "unknown")
    if status != "running":
        return status if isinstance(status, str) else "unknown"
    if on_other_host(state):
        return "running" if heartbeat_fresh(state) else "stale"
    return "running" if run_dir is not None and is_locked(run_dir) else "crashed"
