"""The shard cache: built once, never changed under a run, shared safely; and text `eval`,
which reads only the held-out split."""

import itertools
import json
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from filelock import FileLock
from tokenizers import Tokenizer

from tests.cli import invoke
from bitnet_cli.data import shards as data
from bitnet_cli.errors import BitnetError
from bitnet_cli.data.stories import story, write_stories

TINY = ["--size", "tiny", "--steps", "16", "--batch-size", "8", "--seq-len", "64",
        "--eval-every", "8", "--save-every", "8", "--vocab-size", "512", "--no-compile"]


def endless_hub(experiment):
    """A stand-in for a streamed hub data set: more documents than any run reads."""
    rng = random.Random(7)
    return (story(rng) for _ in itertools.count())


def test_eval_reads_the_runs_held_out_text_from_anywhere(bitnet_home, bitnet_cache, tmp_path,
                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_stories(tmp_path / "text", 400)
    invoke("train", "tinystories", *TINY, "--data", "text/stories.jsonl", "--name", "ev")
    run = bitnet_home / "runs/ev"
    assert json.loads((run / "config.json").read_text())["train"]["data"] == \
        str(tmp_path / "text/stories.jsonl")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if r["split"] == "eval"][-1]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    report = json.loads(invoke("eval", "ev", "--json", "--engine", "float").stdout)
    assert report["step"] == trained["step"] == 16
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert report["metrics"]["unigram_loss"] == pytest.approx(trained["unigram_loss"])

    # Without the cache, only the held-out documents are encoded (with the run's tokenizer),
    # and nothing is written to the cache.
    shutil.rmtree(bitnet_cache / "shards")
    report = json.loads(invoke("eval", "ev", "--json", "--engine", "float").stdout)
    assert report["metrics"]["loss"] == pytest.approx(trained["loss"], rel=1e-6)
    assert "unigram_loss" not in report["metrics"]
    assert not (bitnet_cache / "shards").exists()

    # Other files at the same path, prepared by another run: not this model's data any more.
    write_stories(tmp_path / "text", 300, seed=5)
    data.prepare_shards("tinystories", str(tmp_path / "text/stories.jsonl"), 512, 1)
    result = invoke("eval", "ev", code=1)
    assert "no longer gives the tokenizer" in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_a_longer_run_never_changes_an_earlier_runs_shards(bitnet_cache, monkeypatch):
    monkeypatch.setattr(data, "hub_documents", endless_hub)
    monkeypatch.setattr(data, "TOKENIZER_SAMPLE_CHARS", 50_000)
    first = data.prepare_shards("tinystories", None, 300, 1000)
    assert first.folder.name == data._identity("tinystories", None, 300)[1]
    assert not first.meta["complete"] and first.meta["train_tokens"] >= 1000
    before = {f.name: f.read_bytes() for f in first.folder.iterdir()}

    longer = first.meta["train_tokens"] + 1
    second = data.prepare_shards("tinystories", None, 300, longer)
    assert second.folder.name == f"{first.folder.name}-{longer}"
    assert second.meta["train_tokens"] >= longer
    assert {f.name: f.read_bytes() for f in first.folder.iterdir()} == before

    # Each run finds its own folder again; one in between uses the first that holds enough.
    assert data.prepare_shards("tinystories", None, 300, 1000).folder == first.folder
    assert data.prepare_shards("tinystories", None, 300, longer).folder == second.folder
    assert data.find_shards("tinystories", None, 300, longer - 1).folder == first.folder
    assert data.find_shards("tinystories", None, 300, second.meta["train_tokens"]).folder == \
        second.folder
    assert data.find_shards("tinystories", None, 300, 10**12) is None
    assert len(list((bitnet_cache / "shards").iterdir())) == 2

    # The held-out split alone comes out the same, stopping where each build stopped.
    for shards, budget in ((first, 1000), (second, longer)):
        tok = Tokenizer.from_file(str(shards.tokenizer_path))
        val = data.held_out_tokens("tinystories", None, tok, 10**9, budget)
        assert np.array_equal(val, shards.val)


def test_held_out_tokens_of_local_text_are_the_built_val_split(tmp_path):
    path = str(write_stories(tmp_path, 300))
    shards = data.prepare_shards("tinystories", path, 300, 10**9)
    assert shards.meta["complete"]
    tok = Tokenizer.from_file(str(shards.tokenizer_path))
    assert np.array_equal(data.held_out_tokens("tinystories", path, tok, 10**9, 1), shards.val)
    assert np.array_equal(data.held_out_tokens("tinystories", path, tok, 100, 1), shards.val[:100])


def test_a_damaged_meta_json_is_one_line_naming_it(bitnet_home, tmp_path):
    path = str(write_stories(tmp_path, 300))
    meta = data.prepare_shards("tinystories", path, 300, 1).folder / "meta.json"
    good = json.loads(meta.read_text())
    for damaged in ("{not json", "[1, 2]", json.dumps({k: v for k, v in good.items()
                                                       if k != "dtype"})):
        meta.write_text(damaged)
        with pytest.raises(BitnetError, match="meta.json is damaged"):
            data.prepare_shards("tinystories", path, 300, 1)
    result = invoke("train", "tinystories", *TINY[:-3], "--vocab-size", "300", "--data", path,
                    code=1)
    assert str(meta) in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())


def test_a_failed_build_leaves_nothing_behind(bitnet_cache, tmp_path):
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"story {i}"}) + "\n" for i in range(5)))
    with pytest.raises(BitnetError, match="is too small"):
        data.prepare_shards("tinystories", str(few), 300, 1)
    assert list((bitnet_cache / "shards").iterdir()) == []


PREPARE = """
import sys
from bitnet_cli.data.shards import prepare_shards
shards = prepare_shards("tinystories", sys.argv[1], 300, 1, lambda what, *_: print(what, flush=True))
print("folder", shards.folder.name)
"""


def test_processes_preparing_the_same_data_build_it_once(bitnet_cache, tmp_path):
    path = str(write_stories(tmp_path, 300))
    key = data._identity("tinystories", path, 300)[1]
    (bitnet_cache / "locks").mkdir(parents=True)
    (bitnet_cache / "shards" / f"{key}.partial-dead").mkdir(parents=True)  # a build that died
    lock = FileLock(str(bitnet_cache / "locks" / f"{key}.lock"))
    with lock:  # as if a third process were building: both must wait for it
        procs = [subprocess.Popen([sys.executable, "-c", PREPARE, path], stdout=subprocess.PIPE,
                                  text=True) for _ in range(2)]
        for p in procs:
            assert p.stdout.readline().startswith("waiting for another process")
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum("training the tokenizer" in out for out in outputs) == 1
    assert all(out.splitlines()[-1] == f"folder {key}" for out in outputs)
    assert [f.name for f in (bitnet_cache / "shards").iterdir()] == [key]


LONG_TEXTS = {
    "prose": "\n".join(story(random.Random(i)) for i in range(400)),
    "one line": " ".join(story(random.Random(i)).replace("\n", " ") for i in range(400)),
    "runs of spaces and newlines": "\n\n  ".join(f"word{i}   next\t{i}!" for i in range(5000)),
    "no space at all": "ab\u00e9c\U0001F600" * 20000,
}


@pytest.mark.parametrize("kind", LONG_TEXTS)
def test_a_long_document_encodes_a_piece_at_a_time_to_the_same_ids(kind):
    from bitnet_cli.data.pieces import encode_long, pieces
    text = LONG_TEXTS[kind]
    tok = data.train_tokenizer(iter([LONG_TEXTS["prose"][:200_000]]), 512)
    parts = list(pieces(text, 10_000))
    assert "".join(parts) == text and len(parts) > 5 and max(map(len, parts)) <= 10_000
    whole = tok.encode(text).ids
    if kind != "no space at all":  # with no place to cut cleanly, the seams may differ
        assert [i for p in parts for i in tok.encode(p).ids] == whole
    assert encode_long(tok, text, np.dtype(np.uint16)).tolist() == whole


def test_preparing_one_huge_document_never_encodes_it_whole(tmp_path, monkeypatch):
    """One 3 MB document: tokenizers, training or encoding, is never handed more than a piece of
    it at once (a whole 50 MB one took 7.4 GB), the BPE is the one the whole document trains,
    and the shards hold its ids as one encoding would give them."""
    from bitnet_cli.data import pieces
    folder = tmp_path / "book"
    folder.mkdir()
    book = "\n".join(story(random.Random(i)) for i in range(16_000))
    assert len(book) > 3 * pieces.PIECE_CHARS
    others = [story(random.Random(-i)) for i in range(1, 40)]
    (folder / "book.jsonl").write_text("".join(json.dumps({"text": t}) + "\n"
                                               for t in [book, *others]))
    handed = []
    real_train = data.train_tokenizer

    def recording_tokenizer(documents, vocab_size):
        documents = list(documents)
        handed.extend(map(len, documents))
        tok = real_train(iter(documents), vocab_size)

        class Recording:
            def __getattr__(self, name):
                return getattr(tok, name)

            def encode(self, text):
                handed.append(len(text))
                return tok.encode(text)

            def encode_batch(self, texts):
                handed.extend(map(len, texts))
                return tok.encode_batch(texts)
        return Recording()

    monkeypatch.setattr(data, "train_tokenizer", recording_tokenizer)
    shards = data.prepare_shards("tinystories", str(folder), 512, 1)
    assert max(handed) <= pieces.PIECE_CHARS
    tok = Tokenizer.from_file(str(shards.tokenizer_path))
    sample = [doc for i, doc in enumerate([book, *others]) if not data._is_held_out(i)]
    assert tok.to_str() == real_train(iter(sample), 512).to_str()
    expected = tok.encode(book).ids + [tok.token_to_id(data.EOT)]
    assert shards.train[:len(expected)].tolist() == expected


def test_changing_the_steps_of_a_streamed_run_keeps_its_data_and_cursor(bitnet_home,
                                                                       bitnet_cache, monkeypatch):
    """resume --steps N of a hub-streamed run (longer or shorter) goes on over the token array
    it started on: the shards were sized for the run as planned, and no others are built."""
    monkeypatch.setattr(data, "hub_documents", endless_hub)
    monkeypatch.setattr(data, "TOKENIZER_SAMPLE_CHARS", 50_000)
    args = [a for a in TINY if a not in ("--steps", "16")]
    invoke("train", "tinystories", *args, "--steps", "16", "--name", "hub")
    config = json.loads((bitnet_home / "runs/hub/config.json").read_text())["train"]
    assert config["data_tokens"] == 16 * 8 * 64
    built = sorted(p.name for p in (bitnet_cache / "shards").iterdir())
    invoke("resume", "hub", "--steps", "40")
    invoke("resume", "hub", "--steps", "48")
    assert sorted(p.name for p in (bitnet_cache / "shards").iterdir()) == built
    rows = [json.loads(line) for line in (bitnet_home / "runs/hub/metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["split"] == "train"][-1] == 48
    report = json.loads(invoke("eval", "hub", "--json", "--engine", "float").stdout)
    assert "unigram_loss" in report["metrics"]  # eval found the run's own shards too
