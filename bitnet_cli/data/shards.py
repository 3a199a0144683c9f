"""Text data: a byte-level BPE tokenizer trained on the documents (from documents.py), and token
shards (numpy memmaps) cached so later runs skip the work.

    <cache>/shards/<key>[-<budget>]/train.bin, val.bin   uint16 or uint32 token ids, documents
                                                         separated by <|endoftext|>
                                    tokenizer.json       the BPE the shards were made with
                                    meta.json            what went in, token counts, the
                                                         unigram baseline

Every 20th document is held out for evaluation, so no document is in both splits.

The cache never changes data that a run depends on. <key> hashes the source (the hub dataset,
or each local file's path, size and mtime), the vocabulary size and the format. Local files
are encoded whole; a hub stream only until the run's token budget is in, which leaves the
folder incomplete. A run uses the first folder of its key, in the order they were built (plain
<key> first), that is complete or holds its budget; when none does, it builds <key>-<budget>.
Built folders are never replaced or removed, and a new one is only built when none is enough,
so the same arguments always find the same folder. A build writes into a temporary folder that
is renamed into place when whole, holding <cache>/locks/<key>.lock, so processes that prepare
the same data at once (the ranks of a job, two runs) build it once: the others wait, then find
it. A meta.json that cannot be read is an error naming it, never a reason to rebuild.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from bitnet_cli.data.documents import EOT, HUB_SOURCES, hub_documents, local_documents, local_files
from bitnet_cli.data.pieces import PIECE_CHARS, encode_long, pieces
from bitnet_cli.errors import BitnetError, typed_first_line

HELD_OUT_EVERY = 20
MAX_VAL_TOKENS = 1_000_000
TOKENIZER_SAMPLE_CHARS = 50_000_000  # enough text for a stable BPE; the rest is only encoded
FORMAT_VERSION = 1

Progress = Callable[[str, int, int | None], None]  # (what, done, total or None)


def cache_dir() -> Path:
    configured = os.environ.get("BITNET_CACHE")
    if configured:
        return Path(configured).expanduser()
    import platformdirs
    return Path(platformdirs.user_cache_dir("bitnet"))


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


META_KEYS = ("complete", "train_tokens", "val_tokens", "dtype", "unigram_loss")


class Shards:
    """A prepared data set: token memmaps, the tokenizer that made them, and their metadata."""

    def __init__(self, folder: Path):
        self.folder = folder
        path = folder / "meta.json"
        try:
            self.meta = json.loads(path.read_text())
            missing = [k for k in META_KEYS if k not in self.meta]
            if missing:
                raise ValueError(f"no {', '.join(missing)}")
            dtype = np.dtype(self.meta["dtype"])
            self.train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
            self.val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
        except (OSError, ValueError, TypeError) as e:  # JSON errors are ValueErrors
            raise BitnetError(f"{path} is damaged ({typed_first_line(e, 100)}); delete "
                              f"{folder} to have the data prepared again") from None

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"


def source_identity(experiment: str, data: str | None) -> dict:
    if data is None:
        return {"hub": HUB_SOURCES[experiment]}
    return {"files": [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns]
                      for f in local_files(data)]}


def _identity(experiment: str, data: str | None, vocab_size: int,
              tokenizer=None) -> tuple[dict, str]:
    identity = {"source": source_identity(experiment, data), "vocab_size": vocab_size,
                "version": FORMAT_VERSION}
    if tokenizer is not None:  # a fine-tune reads the text with its model's own tokenizer
        identity["vocab_size"] = tokenizer.get_vocab_size()
        identity["tokenizer"] = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    return identity, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _find(root: Path, key: str, min_train_tokens: int) -> Shards | None:
    built = []
    for folder in root.glob(f"{key}*"):
        suffix = folder.name[len(key):]
        if suffix == "" or (suffix[0] == "-" and suffix[1:].isdigit()):
            built.append((int(suffix[1:] or -1), folder))
    for _, folder in sorted(built):
        shards = Shards(folder)
        if shards.meta["complete"] or shards.meta["train_tokens"] >= min_train_tokens:
            return shards
    return None


def find_shards(experiment: str, data: str | None, vocab_size: int,
                min_train_tokens: int) -> Shards | None:
    """The cached shards that a run with these arguments uses, or None if none are built."""
    _, key = _identity(experiment, data, vocab_size)
    return _find(cache_dir() / "shards", key, min_train_tokens)


@contextlib.contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    from filelock import FileLock, Timeout
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress("waiting for another process preparing the same data", 0, None)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def prepare_shards(experiment: str, data: str | None, vocab_size: int, min_train_tokens: int,
                   progress: Progress | None = None, tokenizer=None) -> Shards:
    """The shards a run with these arguments uses (see the module docstring), built if there
    are none: train the BPE on a sample (or take `tokenizer`, a fine-tuned model's), then encode
    documents until the source ends or `min_train_tokens` are in."""
    progress = progress or (lambda *a: None)
    identity, key = _identity(experiment, data, vocab_size, tokenizer)
    root = cache_dir() / "shards"
    found = _find(root, key, min_train_tokens)
    if found is not None:
        return found
    root.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "locks").mkdir(exist_ok=True)
    with _locked(cache_dir() / "locks" / f"{key}.lock", progress):
        found = _find(root, key, min_train_tokens)  # built by another process while we waited
        if found is not None:
            return found
        for stale in root.glob(f"{key}*.partial-*"):  # left by a build that died
            shutil.rmtree(stale, ignore_errors=True)
        name = f"{key}-{min_train_tokens}" if (root / key).exists() else key
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{name}.partial-"))
        try:
            _build(tmp, identity, _documents(experiment, data), data, min_train_tokens, progress,
                   tokenizer)
            os.rename(tmp, root / name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return Shards(root / name)


def _documents(experiment: str, data: str | None) -> Callable[[], Iterator[str]]:
    return lambda: local_documents(local_files(data)) if data else hub_documents(experiment)


def _is_held_out(index: int) -> bool:
    return index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def _dtype(tok) -> np.dtype:
    return np.dtype(np.uint16 if tok.get_vocab_size() <= 2**16 else np.uint32)


def _build(tmp: Path, identity: dict, documents: Callable[[], Iterator[str]], data: str | None,
           budget: int, progress: Progress, tok=None) -> None:
    if tok is None:
        progress("training the tokenizer", 0, None)
        sample = _sample((d for i, d in enumerate(documents()) if not _is_held_out(i)),
                         TOKENIZER_SAMPLE_CHARS)
        if not sample:
            raise BitnetError(f"--data {data} holds no text" if data else "the data set is empty")
        # A piece at a time here too: the trainer keeps a whole document's words (7 GB for 50
        # MB), and pieces cut between pre-tokens give it the same word counts, so the same BPE.
        tok = train_tokenizer((piece for doc in sample for piece in pieces(doc)),
                              identity["vocab_size"])
    dtype = _dtype(tok)
    stop_at = None if data else budget  # a hub stream has more; this run does not need it
    counts = {"train": 0, "val": 0}
    unigram = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    with open(tmp / "train.bin", "wb") as train_f, open(tmp / "val.bin", "wb") as val_f:
        for split, ids in _encoded(documents(), tok, stop_at, progress=progress):
            (val_f if split == "val" else train_f).write(ids.tobytes())
            counts[split] += len(ids)
            if split == "train":
                unigram += np.bincount(ids, minlength=len(unigram))
    if counts["val"] == 0:
        raise BitnetError(f"--data {data} is too small: it needs at least {HELD_OUT_EVERY} "
                          "documents, so that one can be held out for evaluation (a .txt file "
                          f"is split into documents at {EOT} where it holds one, else at blank "
                          "lines; each .jsonl line or .parquet row is one document)")
    tok.save(str(tmp / "tokenizer.json"))
    meta = {**identity, "budget": budget, "complete": stop_at is None or counts["train"] < stop_at,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "dtype": dtype.name,
            "unigram_loss": unigram_cross_entropy(unigram, np.fromfile(tmp / "val.bin", dtype=dtype))}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


def _encoded(documents: Iterator[str], tok, stop_at: int | None, train: bool = True,
             progress: Progress | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """(split, token ids ending in EOT) per document, in source order, split as every build
    splits: held out while val holds under MAX_VAL_TOKENS, and reading stops after the batch
    in which train reaches `stop_at`. train=False skips encoding the training documents."""
    eot, dtype = tok.token_to_id(EOT), _dtype(tok)
    counts = {"train": 0, "val": 0}
    batch: list[tuple[int, str]] = []

    def flush() -> Iterator[tuple[str, np.ndarray]]:
        wanted = [(i, doc) for i, doc in batch if train or _is_held_out(i)]
        short = [doc for _, doc in wanted if len(doc) <= PIECE_CHARS]
        encoded = iter(tok.encode_batch(short))
        for index, doc in wanted:
            body = (np.array(next(encoded).ids, dtype=dtype) if len(doc) <= PIECE_CHARS
                    else encode_long(tok, doc, dtype))
            ids = np.append(body, np.array(eot, dtype=dtype))
            split = "val" if _is_held_out(index) and counts["val"] < MAX_VAL_TOKENS else "train"
            counts[split] += len(ids)
            yield split, ids
        batch.clear()
        if progress:
            progress("encoding", counts["train"], stop_at)

    for index, doc in enumerate(documents):
        batch.append((index, doc))
        if len(batch) == 256:
            yield from flush()
            if stop_at is not None and counts["train"] >= stop_at:
                return
    yield from flush()


def held_out_tokens(experiment: str, data: str | None, tokenizer, max_tokens: int,
                    min_train_tokens: int) -> np.ndarray:
    """The start (up to `max_tokens`) of the val split that prepare_shards builds for these
    arguments, made with `tokenizer` instead of a newly trained BPE, and without the train
    split: local files need only their held-out documents; a hub stream is also encoded up to
    the budget, to stop where the build stops."""
    parts, total = [], 0
    stop_at = None if data else min_train_tokens
    for split, ids in _encoded(_documents(experiment, data)(), tokenizer, stop_at,
                               train=stop_at is not None):
        if split == "val":
            parts.append(ids)
            total += len(ids)
            if total >= max_tokens:
                break
    if not parts:
        raise BitnetError(f"--data {data} has no held-out documents to evaluate on (it needs at "
                          f"least {HELD_OUT_EVERY})" if data else "the data set is empty")
    return np.concatenate(parts)[:max_tokens]


def unigram_cross_entropy(train_counts: np.ndarray, val_tokens: np.ndarray) -> float:
    """The held-out loss (nats/token) of predicting each token by its training frequency alone
    (add-one smoothed): the bar any model that has learned something must clear."""
    probs = (train_counts + 1) / (train_counts.sum() + len(train_counts))
    return float(-np.log(probs[val_tokens.astype(np.int64)]).mean()) if len(val_tokens) else math.nan
