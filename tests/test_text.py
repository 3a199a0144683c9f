"""Natural language: local data with the real datasets' schemas, BPE, shards, chat."""

import json
import shutil
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.cli import invoke
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn.model import BitNetForCausalLM, generate
from tests.contract import assert_greedy_agree, same_continuation, stepped_logits
from bitnet_cli.data.stories import story, write_stories

TINY = ["--size", "tiny", "--steps", "16", "--batch-size", "8", "--seq-len", "64",
        "--eval-every", "8", "--save-every", "8", "--vocab-size", "512", "--no-compile"]


@pytest.fixture
def tinystories_parquet(tmp_path):
    """The TinyStories schema: one `text` column."""
    import random
    rng = random.Random(1)
    folder = tmp_path / "tinystories"
    folder.mkdir()
    pq.write_table(pa.table({"text": [story(rng) for _ in range(600)]}), folder / "train.parquet")
    return folder


@pytest.fixture
def fineweb_jsonl(tmp_path):
    """The FineWeb-Edu schema: text plus the metadata columns it ships with."""
    import random
    rng = random.Random(2)
    path = tmp_path / "fineweb.jsonl"
    with open(path, "w") as f:
        for i in range(600):
            f.write(json.dumps({"text": story(rng), "id": f"<urn:uuid:{i}>", "dump": "CC-MAIN-2024-10",
                                "url": f"http://example.org/{i}", "date": "2024-02-20",
                                "file_path": "s3://x", "language": "en", "language_score": 0.97,
                                "token_count": 80, "score": 3.1, "int_score": 3}) + "\n")
    return path


def test_tinystories_parquet_end_to_end(bitnet_home, bitnet_cache, tinystories_parquet):
    invoke("train", "tinystories", *TINY, "--data", str(tinystories_parquet), "--name", "ts")
    run = bitnet_home / "runs/ts"
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["data"] == str(tinystories_parquet.resolve())
    assert config["model"]["vocab_size"] <= 512
    (shards,) = (bitnet_cache / "shards").iterdir()
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["train_tokens"] > 10 * meta["val_tokens"] > 0
    assert (shards / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [8, 16] and all("unigram_loss" in r for r in evals)

    # Resume continues it; the shards are found in the cache, not rebuilt.
    built = (shards / "meta.json").stat().st_mtime_ns
    invoke("resume", "ts", "--steps", "24")
    assert (shards / "meta.json").stat().st_mtime_ns == built
    assert json.loads((run / "state.json").read_text())["step"] == 24

    result = invoke("chat", "ts", "--prompt", "Once upon a time", "--temperature", "0",
                    "--max-new-tokens", "12")
    assert result.stdout.endswith("\n")  # what a 24-step model says is its own affair
    assert "tok/s" in result.stderr


def test_fineweb_jsonl_end_to_end(bitnet_home, fineweb_jsonl):
    invoke("train", "baseline", *TINY, "--data", str(fineweb_jsonl), "--name", "fw")
    assert json.loads((bitnet_home / "runs/fw/state.json").read_text())["status"] == "finished"
    invoke("chat", "fw", "--prompt", "The dog", "--max-new-tokens", "8", "--seed", "1")


def test_txt_files_and_folders(bitnet_home, tmp_path):
    write_stories(tmp_path / "txt", 400, fmt="txt")
    invoke("train", "tinystories", *TINY, "--data", str(tmp_path / "txt"), "--name", "t")


def test_same_data_reuses_the_shards(bitnet_home, bitnet_cache, tinystories_parquet):
    invoke("train", "tinystories", *TINY, "--data", str(tinystories_parquet))
    (shards,) = (bitnet_cache / "shards").iterdir()
    built = (shards / "train.bin").stat().st_mtime_ns
    short = ["--steps", "2", "--eval-every", "2", "--save-every", "2"]  # the data is the point
    invoke("train", "tinystories", *TINY, *short, "--data", str(tinystories_parquet))
    assert (shards / "train.bin").stat().st_mtime_ns == built
    invoke("train", "tinystories", *TINY, *short, "--vocab-size", "300",
           "--data", str(tinystories_parquet))
    assert len(list((bitnet_cache / "shards").iterdir())) == 2  # another vocabulary, other shards


def _no_network(*args, **kwargs):
    raise AssertionError("tried to connect to the network")


def test_hub_offline_is_one_line_without_touching_the_network(bitnet_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", _no_network)
    result = invoke("train", "tinystories", "--size", "tiny", code=1)
    assert result.stderr.count("\n") == 1 and "--data PATH" in result.stderr, result.stderr
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())


def test_unreachable_hub_is_one_line_before_datasets_retries(bitnet_home, monkeypatch):
    """datasets would retry an unreachable hub for ~20 s; one failed connection must end it."""
    import datasets

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable")

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(datasets, "load_dataset", _no_network)
    result = invoke("train", "tinystories", "--size", "tiny", code=1)
    assert result.stderr.count("\n") == 1 and "cannot be reached" in result.stderr, result.stderr
    assert "--data PATH" in result.stderr


def test_bad_data(bitnet_home, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_text = tmp_path / "no_text.parquet"
    pq.write_table(pa.table({"story": ["a b c"] * 50}), no_text)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    fake = tmp_path / "fake.parquet"
    fake.write_bytes(b"not parquet at all")
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"story {i}"}) + "\n" for i in range(5)))
    one_document = tmp_path / "lines.txt"  # no blank line and no <|endoftext|>: one document
    one_document.write_text("".join(f"line {i} of a book\n" for i in range(500)))
    cases = [
        (empty, "holds no .txt, .jsonl, .parquet files"),
        (no_text, "has no 'text' column (it has: story)"),
        (binary, "is not UTF-8 text (is it a binary file?)"),
        (fake, "is not a readable parquet file"),
        (few, "is too small"),
        (one_document, "is split into documents at <|endoftext|> where it holds one, else at "
                       "blank lines"),
        (tmp_path / "missing", "does not exist"),
    ]
    for path, message in cases:
        result = invoke("train", "tinystories", *TINY, "--data", str(path), code=1)
        assert message in result.stderr and result.stderr.strip().count("\n") == 0, result.stderr
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())
    result = invoke("train", "arithmetic", "--data", str(few), code=1)
    assert "makes its own data and takes no --data" in result.stderr


def test_prompt_longer_than_the_context(bitnet_home, tinystories_parquet):
    invoke("train", "tinystories", *TINY, "--data", str(tinystories_parquet), "--name", "ctx")
    result = invoke("chat", "ctx", "--prompt", "the dog ran " * 200, code=1)
    assert "but this model reads at most 64" in result.stderr
    assert result.stderr.count("\n") == 1


def test_kv_cache_generation_keeps_the_engines_contract():
    """Decoding with the KV cache sums each token's products in another order than a whole
    pass does: along the same tokens their logits keep the engines' contract, and so do the
    greedy continuations with and without the cache."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=128, max_position_embeddings=160)
    model = BitNetForCausalLM(cfg).eval()
    prompt = [5, 17, 42, 8, 3]
    cached = list(generate(model, prompt, 120))
    assert len(cached) == 120
    with torch.no_grad():
        whole = model(torch.tensor([prompt + cached[:-1]]))[:, len(prompt) - 1:]
    assert_greedy_agree(stepped_logits(model, model, prompt, cached), whole)
    assert same_continuation(list(generate(model, prompt, 120, use_cache=False)), whole, cached)
    # Sampling with the same seed is repeatable, and stops at a stop id.
    a = list(generate(model, prompt, 50, temperature=1.0, top_k=20, top_p=0.9,
                      generator=torch.Generator().manual_seed(3)))
    b = list(generate(model, prompt, 50, temperature=1.0, top_k=20, top_p=0.9,
                      generator=torch.Generator().manual_seed(3)))
    assert a == b
    stop = a[10]
    c = list(generate(model, prompt, 50, temperature=1.0, top_k=20, top_p=0.9, stop_ids=(stop,),
                      generator=torch.Generator().manual_seed(3)))
    assert c == a[:a.index(stop) + 1]
    # The context bounds the reply.
    assert len(list(generate(model, [i % 97 for i in range(150)], 50))) == 10


def test_top_k_and_top_p_restrict_the_choice():
    from bitnet_cli.nn.model import sample_next
    logits = torch.tensor([5.0, 4.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(200)} == {0, 1}
    # p=0.5: token 0 alone already holds over half of the mass.
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(200)} == {0}
    assert sample_next(logits, 0.0) == 0


def test_text_resume_from_an_earlier_checkpoint_is_exact(bitnet_home, tinystories_parquet):
    invoke("train", "tinystories", *TINY, "--data", str(tinystories_parquet), "--name", "exact")
    ckpts = bitnet_home / "runs/exact/checkpoints"
    last = ckpts / (ckpts / "latest").read_text().strip()
    (earlier,) = [d for d in ckpts.iterdir() if d.is_dir() and d != last]
    final = (last / "model.safetensors").read_bytes()
    # Lose the last checkpoint, as a crash between saves would, and train those steps again.
    shutil.rmtree(last)
    (ckpts / "latest").write_text(earlier.name + "\n")
    invoke("resume", "exact")
    assert (last / "model.safetensors").read_bytes() == final
