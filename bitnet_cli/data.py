"""Text data: documents from the Hugging Face hub or local files, a byte-level BPE tokenizer
trained on them, and token shards (numpy memmaps) cached so later runs skip the work.

    <cache>/shards/<key>/train.bin, val.bin   uint16 or uint32 token ids, documents separated
                                              by <|endoftext|>
    <cache>/shards/<key>/tokenizer.json       the BPE the shards were made with
    <cache>/shards/<key>/meta.json            what went in, token counts, the unigram baseline

Every 20th document is held out for evaluation, so no document is in both splits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bitnet_cli.errors import BitnetError

EOT = "<|endoftext|>"
SUFFIXES = (".txt", ".jsonl", ".parquet")
HELD_OUT_EVERY = 20
MAX_VAL_TOKENS = 1_000_000
TOKENIZER_SAMPLE_CHARS = 50_000_000  # enough text for a stable BPE; the rest is only encoded
FORMAT_VERSION = 1

# The hub datasets behind the built-in text experiments (streamed: never downloaded whole).
HUB_SOURCES = {
    "tinystories": {"path": "roneneldan/TinyStories", "name": None, "split": "train"},
    "baseline": {"path": "HuggingFaceFW/fineweb-edu", "name": "sample-10BT", "split": "train"},
}

Progress = Callable[[str, int, int | None], None]  # (what, done, total or None)


def cache_dir() -> Path:
    configured = os.environ.get("BITNET_CACHE")
    if configured:
        return Path(configured).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("bitnet"))


# --- where documents come from -------------------------------------------------------------

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
               if offline else f"{type(e).__name__}: {str(e)[:200]}")
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


# --- tokenizer and shards ------------------------------------------------------------------

def train_tokenizer(documents: Iterator[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(documents, trainer)
    return tok


def _sample(documents: Iterator[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for doc in documents:
        out.append(doc)
        total += len(doc)
        if total >= max_chars:
            break
    return out


class Shards:
    """A prepared data set: token memmaps, the tokenizer that made them, and their metadata."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(self.meta["dtype"])
        self.train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
        self.val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"


def source_identity(experiment: str, data: str | None) -> dict:
    if data is None:
        return {"hub": HUB_SOURCES[experiment]}
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in local_files(data)]}


def prepare_shards(experiment: str, data: str | None, vocab_size: int, min_train_tokens: int,
                   progress: Progress | None = None) -> Shards:
    """Find the cached shards for this source and vocabulary, or build them: train the BPE on
    a sample, then encode documents until the source ends or `min_train_tokens` are in."""
    progress = progress or (lambda *a: None)
    identity = {"source": source_identity(experiment, data), "vocab_size": vocab_size,
                "version": FORMAT_VERSION}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "shards" / key
    if (folder / "meta.json").is_file():
        shards = Shards(folder)
        if shards.meta["complete"] or shards.meta["train_tokens"] >= min_train_tokens:
            return shards

    def documents() -> Iterator[str]:
        return local_documents(local_files(data)) if data else hub_documents(experiment)

    progress("training the tokenizer", 0, None)
    sample = _sample((d for i, d in enumerate(documents()) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1),
                     TOKENIZER_SAMPLE_CHARS)
    if not sample:
        raise BitnetError(f"--data {data} holds no text" if data else "the data set is empty")
    tok = train_tokenizer(iter(sample), vocab_size)
    eot = tok.token_to_id(EOT)
    dtype = np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32

    tmp = folder.with_name(folder.name + f".partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"train": 0, "val": 0}
    unigram = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    complete = True
    with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
        batch: list[tuple[int, str]] = []

        def flush() -> None:
            encodings = tok.encode_batch([doc for _, doc in batch])
            for (index, _), enc in zip(batch, encodings):
                ids = np.array(enc.ids + [eot], dtype=dtype)
                held_out = index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 and \
                    counts["val"] < MAX_VAL_TOKENS
                split = "val" if held_out else "train"
                (val_f if held_out else train_f).write(ids.tobytes())
                counts[split] += len(ids)
                if not held_out:
                    unigram[:] += np.bincount(ids, minlength=len(unigram))
            batch.clear()
            progress("encoding", counts["train"], min_train_tokens if not data else None)

        for index, doc in enumerate(documents()):
            batch.append((index, doc))
            if len(batch) == 256:
                flush()
                if counts["train"] >= min_train_tokens and not data:
                    complete = False  # a hub stream has more; this run does not need it
                    break
        if batch:
            flush()
    if counts["val"] == 0:
        raise BitnetError(f"--data {data} is too small: it needs at least {HELD_OUT_EVERY} "
                          "documents, so that one can be held out for evaluation")
    tok.save(str(tmp / "tokenizer.json"))
    meta = {**identity, "complete": complete, "train_tokens": counts["train"],
            "val_tokens": counts["val"], "dtype": np.dtype(dtype).name,
            "unigram_loss": unigram_cross_entropy(unigram, np.fromfile(tmp / "val.bin", dtype=dtype))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return Shards(folder)


def unigram_cross_entropy(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """The held-out loss (nats/token) of predicting each token by its training frequency alone
    (add-one smoothed): the bar any model that has learned something must clear."""
    probs = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[val_tokens.astype(np.int64)]).mean()) if len(val_tokens) else math.nan
