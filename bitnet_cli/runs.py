"""Where runs live, how they are named, and their state.json heartbeat. No torch here."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import datetime
from pathlib import Path

from bitnet_cli.errors import BitnetError

STATE_FILE, CONFIG_FILE, METRICS_FILE, TOKENIZER_FILE = (
    "state.json", "config.json", "metrics.jsonl", "tokenizer.json")


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
    return path


def runs_dir() -> Path:
    return home() / "runs"


def create_run_dir(experiment: str, size: str, name: str | None = None) -> Path:
    """A new, empty run folder. Never reuses an existing one."""
    parent = runs_dir()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BitnetError(f"cannot create the runs folder {parent}: {e.strerror}") from None
    base = name or f"{experiment}-{size}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1, 1000):
        candidate = parent / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            if name:
                raise BitnetError(f"a run named {name!r} already exists in {parent}; "
                                  "choose another --name") from None
    raise BitnetError(f"too many runs named {base!r} in {parent}")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


def now_iso() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


class StateFile:
    """state.json: what a run is doing right now, rewritten atomically as a heartbeat."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STATE_FILE
        self.state = read_json(self.path) if self.path.exists() else {}

    def update(self, **fields) -> None:
        self.state.update(fields, pid=os.getpid(), host=socket.gethostname(),
                          updated_at=now_iso(), updated_unix=time.time())
        write_json_atomic(self.path, self.state)


def list_run_dirs() -> list[Path]:
    """Every run folder (one holding config.json), oldest first."""
    parent = runs_dir()
    if not parent.is_dir():
        return []
    runs = [p for p in parent.iterdir() if (p / CONFIG_FILE).is_file()]
    return sorted(runs, key=_created_key)


def _created_key(run_dir: Path):
    try:
        return (read_json(run_dir / CONFIG_FILE).get("created_at", ""), run_dir.name)
    except (OSError, ValueError):
        return ("", run_dir.name)


def resolve_run(selector: str) -> Path:
    """A run folder from a run id, a unique prefix of one, 'latest', or a path."""
    path = Path(selector).expanduser()
    if path.exists():
        # A run folder, or a path inside one (checkpoints/, a checkpoint folder).
        for folder in (path, path.parent, path.parent.parent):
            if (folder / CONFIG_FILE).is_file():
                return folder.resolve()
        raise BitnetError(f"{path} is not a run folder (it has no {CONFIG_FILE})")
    if len(path.parts) > 1:
        raise BitnetError(f"{path} does not exist")
    runs = list_run_dirs()
    if selector == "latest":
        if not runs:
            raise BitnetError(f"there are no runs in {runs_dir()} yet; start one with `bitnet train`")
        return runs[-1]
    names = {p.name: p for p in runs}
    if selector in names:
        return names[selector]
    matches = [name for name in names if name.startswith(selector)]
    if len(matches) == 1:
        return names[matches[0]]
    if len(matches) > 1:
        raise BitnetError(f"run {selector!r} matches {len(matches)} runs ({_listing(matches)}); "
                          "give more of the run id")
    if not names:
        raise BitnetError(f"no run {selector!r}: there are no runs in {runs_dir()} yet")
    import difflib
    close = difflib.get_close_matches(selector, list(names), n=3, cutoff=0.5)
    hint = f"closest: {_listing(close)}" if close else f"there are: {_listing(list(names)[-3:])}"
    raise BitnetError(f"no run {selector!r} in {runs_dir()}; {hint}")


def _listing(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")


def pid_alive(pid: int | None, host: str | None) -> bool | None:
    """True/False for a pid on this host; None when the run lives on another machine."""
    if not pid:
        return False
    if host and host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_status(state: dict) -> str:
    """The status to show: state.json's, except a 'running' run whose process is gone is
    'crashed' (killed, power loss) rather than running forever."""
    status = state.get("status", "unknown")
    if status == "running" and pid_alive(state.get("pid"), state.get("host")) is False:
        return "crashed"
    return status
