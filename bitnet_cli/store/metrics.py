"""metrics.jsonl: one JSON object per line, appended as training goes; read back tolerantly."""

from __future__ import annotations

import json
import os
from pathlib import Path

from bitnet_cli.config.numbers import real
from bitnet_cli.errors import BitnetError
from bitnet_cli.store.files import to_json, write_bytes_atomic

# The rows health.py writes at each evaluation of a ternary run (names and meanings).
TERNARY_SPLIT = "ternary"
# Shares of codes -1, 0, +1 and of codes changed, mean|W|, mean per-token input absmax.
TERNARY_METRICS = ("minus", "zeros", "plus", "flips", "scale", "act_absmax")


class MetricsWriter:
    """Appends rows; never through a symlink (O_NOFOLLOW), so a planted link cannot make a
    run write outside its folder. Non-finite numbers are written as null."""

    def __init__(self, path: Path):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise BitnetError(f"cannot append to {path}: {e.strerror} (is it a symbolic "
                              "link? bitnet writes only inside the run folder)") from None
        self.file = os.fdopen(fd, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        self.file.write(to_json(row, indent=None) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


TENSORBOARD_FOLDER = "tensorboard"
TENSORBOARD_EXTRA = ("--tensorboard needs TensorBoard, which is not installed: pip install "
                     "'bitnet-cli[tensorboard]' (with pipx: pipx inject bitnet-cli tensorboard)")
NOT_SCALARS = {"step", "split", "time", "tokens", "flips_since"}


def check_tensorboard() -> None:
    """One line, before anything is written, when the optional extra is missing."""
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        raise BitnetError(TENSORBOARD_EXTRA)


class TensorBoardWriter:
    """The same rows as TensorBoard event files in RUN/tensorboard, as `split/metric` scalars
    (train/loss, eval/acc/+, ternary/flips, ...), through torch's SummaryWriter (TensorBoard's
    own event format). A resumed run purges the events past its checkpoint, as metrics.jsonl
    drops those rows, so TensorBoard shows each step once."""

    def __init__(self, run_dir: Path, step: int):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        folder = run_dir / TENSORBOARD_FOLDER
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise BitnetError(f"{folder} is not a folder of the run's own; move it away (bitnet "
                              "writes only inside the run folder)")
        # Events from an earlier session at steps after `step` are dropped by TensorBoard's
        # reader (the rows up to the checkpoint's step stay, as in metrics.jsonl), from step 0
        # too: a run killed before its first checkpoint starts again from there.
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=step + 1)

    def write(self, row: dict) -> None:
        for key, value in row.items():
            if key not in NOT_SCALARS and real(value):
                self.writer.add_scalar(f"{row['split']}/{key}", value, global_step=row["step"],
                                       walltime=row.get("time"))

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """Every writer a run logs to (metrics.jsonl, and TensorBoard with --tensorboard)."""

    def __init__(self, *writers):
        self.writers = writers

    def write(self, row: dict) -> None:
        for writer in self.writers:
            writer.write(row)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()


def read_metrics(path: Path) -> list[dict]:
    """Every complete row; a line cut short by a crash (or any unreadable line) is skipped, and
    a file that cannot be read at all has none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _parse(f)
    except OSError:
        return []


def _parse(lines) -> list[dict]:
    """The rows that are JSON objects with a whole-number step. Of their fields only finite
    numbers and the split (a string) are kept: NaN, Infinity or a wrong type reads as absent."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if not isinstance(row, dict):
            continue
        row = {key: value for key, value in row.items() if real(value)
               or (key == "split" and isinstance(value, str))}
        if isinstance(row.get("step"), int) and row["step"] >= 0:
            rows.append(row)
    return rows


def read_metrics_tail(path: Path, max_bytes: int = 256 * 1024) -> list[dict]:
    """The complete rows in the last `max_bytes` of the file: enough for the latest train and
    eval rows without reading a days-long run's whole history."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first line was cut by the seek
    return _parse(lines)


def truncate_metrics(path: Path, step: int | None) -> None:
    """Keep only the complete rows up to `step`, or none (rewritten atomically; untouched if
    already so)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if (step is not None and isinstance(row, dict) and isinstance(row.get("step"), int)
                and row["step"] <= step):
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        write_bytes_atomic(path, "".join(kept).encode())


def per_layer(row: dict, metric: str) -> dict[str, float]:
    """One metric of a ternary row, layer by layer, in the model's order."""
    prefix = f"{metric}/"
    return {key[len(prefix):]: value for key, value in row.items() if key.startswith(prefix)}
