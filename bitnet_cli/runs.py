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
