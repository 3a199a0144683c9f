"""metrics.jsonl: one JSON object per line, appended as training goes; read back tolerantly."""

from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsWriter:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def write(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: Path) -> list[dict]:
    """Every complete row; a line cut short by a crash (or any unreadable line) is skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return _parse(f)
    except FileNotFoundError:
        return []


def _parse(lines) -> list[dict]:
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
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
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if size > max_bytes:
        lines = lines[1:]  # the first line was cut by the seek
    return _parse(lines)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep only the complete rows up to `step` (rewritten atomically; untouched if already so)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if kept != lines:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
