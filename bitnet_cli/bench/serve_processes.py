"""What `bitnet bench --serve` serves, and the servers serving it: a model of a preset's shape
with random weights written as a run (with a made-up byte-level BPE of the shape's vocabulary)
and as llama.cpp's GGUF, and `bitnet serve` and llama-cpp-python's server each a process of its
own on a free loopback port, its output in a file, stopped however the bench ends (and, on
Linux, killed with the bench process if that is killed outright: PR_SET_PDEATHSIG)."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CONTEXT = 256  # of both servers: a prompt and its new tokens fit, with room
START_S = 600  # a cold first build of the 2-bit kernel takes a minute or two on 2 cores
STOP_S = 15
READY_BITNET = re.compile(r"serving (\S+) \((.+?) engine.*? at (http://\S+) ")
READY_LLAMA = re.compile(r"Uvicorn running on (http://\S+)")


class ServerFailed(RuntimeError):
    """A server process that exited, or said nothing, before it was ready."""


def byte_bpe(vocab_size: int):
    """A byte-level BPE of `vocab_size` tokens made up rather than trained (the bench has no
    data): <|endoftext|>, the 256 bytes, then every pair and then triples of the bytes that
    plain English is written with. Random weights pick any token, and nearly every one is text,
    so the servers stream what they decode; the prompts read as words of a few tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from bitnet_cli.data.shards import EOT
    letters = ["\u0120", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ,."]  # \u0120: " "
    merged = itertools.chain(itertools.product(letters, repeat=2),
                             ((a + b, c) for a, b, c in itertools.product(letters, repeat=3)))
    vocab = {EOT: 0, **{byte: 1 + i for i, byte in
                        enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    merges = list(itertools.islice(merged, vocab_size - len(vocab)))
    for left, right in merges:
        vocab[left + right] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT, special=True)])
    return tokenizer


def write_run(folder: Path, model, tokenizer, experiment: str) -> Path:
    """`model` saved as the one checkpoint of a run of `experiment` in `folder`, as training
    writes one; the checkpoint's folder."""
    from bitnet_cli.config.reading import to_dict
    from bitnet_cli.store.checkpoint import save_checkpoint
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    trainer = {"step": 1, "experiment": experiment, "model": to_dict(model.config)}
    return save_checkpoint(folder / "checkpoints", 1, model, torch.optim.AdamW(model.parameters()),
                           trainer, keep=1, tokenizer=folder / "tokenizer.json")


def write_gguf_of(model, tokenizer, checkpoint: Path, experiment: str) -> Path:
    """The model as llama.cpp's GGUF (TQ2_0 codes, F16 embedding), beside its checkpoint."""
    from bitnet_cli.use.gguf_writer import GGUF_FILE, write_gguf
    from bitnet_cli.use.loading import LoadedModel
    write_gguf(LoadedModel(model, tokenizer, model.config, experiment, checkpoint, 1),
               checkpoint.parent)
    return checkpoint.parent / GGUF_FILE


# --- the server processes ------------------------------------------------------------------

def _die_with_parent():
    """Run in the child before it starts (Linux): killed when the bench process dies, even
    by SIGKILL, which leaves the bench no time to stop it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Server:
    """A server process of the bench, its output in a file: started, waited for until a line
    matches `ready` (self.ready), and stopped (SIGTERM, then SIGKILL) when the block ends."""

    def __init__(self, command: list[str], log: Path, ready: re.Pattern, start_s: float = START_S):
        self.command, self.log, self.ready_line, self.start_s = command, log, ready, start_s
        self.process = None

    def __enter__(self) -> "Server":
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_die_with_parent
                                            if sys.platform.startswith("linux") else None)
        try:
            self.ready = self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _wait_ready(self) -> re.Match:
        deadline = time.monotonic() + self.start_s
        while True:
            match = self.ready_line.search(self.output())
            if match:
                return match
            if self.process.poll() is not None:
                raise ServerFailed(f"exited ({self.process.returncode}) before it served: "
                                   f"{self._last_line()}")
            if time.monotonic() > deadline:
                raise ServerFailed(f"not serving after {self.start_s} s: {self._last_line()}")
            time.sleep(0.2)

    def _last_line(self) -> str:
        lines = [line for line in self.output().splitlines() if line.strip()]
        return lines[-1].strip() if lines else "no output"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(STOP_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def bitnet_server(checkpoint: Path, log: Path, streams: int) -> Server:
    """`bitnet serve CHECKPOINT` on the CPU, up to `streams` sequences decoded together."""
    return Server([sys.executable, "-m", "bitnet_cli", "serve", str(checkpoint), "--host",
                   "127.0.0.1", "--port", "0", "--device", "cpu", "--max-streams", str(streams)],
                  log, READY_BITNET)


def llama_cpp_settings(threads: int) -> dict:
    """How llama_cpp.server runs for the bench: the context bitnet's has, `threads` threads, a
    new request queued rather than cutting the open stream short, logits of the last position
    only."""
    return {"n_ctx": CONTEXT, "n_threads": threads, "n_threads_batch": threads,
            "interrupt_requests": False, "logits_all": False, "verbose": False}


def llama_cpp_server(gguf: Path, log: Path, settings: dict) -> Server:
    options = [item for name, value in settings.items() for item in (f"--{name}", str(value))]
    return Server([sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host",
                   "127.0.0.1", "--port", "0", *options], log, READY_LLAMA)
