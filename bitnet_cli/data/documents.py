"""Where text documents come from: local .txt, .jsonl and .parquet files, or a Hugging Face
hub dataset streamed (never downloaded whole)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Iterator

from bitnet_cli.errors import BitnetError, typed_first_line

EOT = "<|endoftext|>"  # also what separates documents in a .txt file that contains it
SUFFIXES = (".txt", ".jsonl", ".parquet")

# The hub datasets behind the built-in text experiments.
HUB_SOURCES = {
    "tinystories": {"path": "roneneldan/TinyStories", "name": None, "split": "train"},
    "baseline": {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"},
}


def local_files(path: str) -> list[Path]:
    root = Path(path).expanduser()
    if not root.exists():
        raise BitnetError(f"--data {path} does not exist")
    if root.is_file():
        files = [root]
    else:
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise BitnetError(f"--data {path} holds no {', '.join(SUFFIXES)} files")
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise BitnetError(f"--data {f}: expected a {', '.join(SUFFIXES)} file or a folder of them")
    return files


def _text_documents(f: Path) -> Iterator[str]:
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise BitnetError(f"{f} is not UTF-8 text (is it a binary file?)") from None
    if "\x00" in text:
        raise BitnetError(f"{f} is not text: it contains NUL bytes (is it a binary file?)")
    separator = EOT if EOT in text else "\n\n"
    for doc in text.split(separator):
        if doc.strip():
            yield doc.strip()


def _jsonl_documents(f: Path) -> Iterator[str]:
    with open(f, encoding="utf-8", errors="strict") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise BitnetError(f"{f} line {number} is not JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise BitnetError(f"{f} line {number} has no 'text' string field")
                if row["text"].strip():
                    yield row["text"]
        except UnicodeDecodeError:
            raise BitnetError(f"{f} is not UTF-8 text (is it a binary file?)") from None


def _parquet_documents(f: Path) -> Iterator[str]:
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(f)
    except Exception:
        raise BitnetError(f"{f} is not a readable parquet file") from None
    columns = table.schema_arrow.names
    if "text" not in columns:
        raise BitnetError(f"{f} has no 'text' column (it has: {', '.join(columns) or 'none'})")
    for batch in table.iter_batches(columns=["text"], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


def local_documents(files: list[Path]) -> Iterator[str]:
    readers = {".txt": _text_documents, ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for f in files:
        yield from readers[f.suffix.lower()](f)


def hub_documents(experiment: str) -> Iterator[str]:
    source = HUB_SOURCES[experiment]
    hint = ("pass local text with --data PATH (.txt, .jsonl or .parquet files with a 'text' "
            "field, or a folder of them)")
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline:
        _check_hub_reachable(hint)
    import datasets
    try:
        stream = datasets.load_dataset(source["path"], source["name"], split=source["split"],
                                       streaming=True)
        for row in stream:
            if row.get("text"):
                yield row["text"]
    except Exception as e:  # datasets raises many types for a missing hub or cache
        why = ("the hub is switched off here (HF_HUB_OFFLINE) and it is not in the local cache"
               if offline else typed_first_line(e))
        raise BitnetError(f"cannot load {source['path']}: {why}; {hint}") from None


def _check_hub_reachable(hint: str, timeout: float = 3.0) -> None:
    """datasets retries an unreachable hub for ~20 s; a plain connection attempt says so in 3."""
    from urllib.parse import urlparse
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:
        raise BitnetError(f"the Hugging Face hub ({endpoint.hostname}) cannot be reached from "
                          f"here; {hint}") from None
