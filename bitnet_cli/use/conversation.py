"""A conversation with a trained model: prompt formatting per experiment, history kept within
the context window, and replies streamed as text as the tokens are made. No Rich, no argv."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn.devices import autocast_for
from bitnet_cli.config.sampling import check_sampling
from bitnet_cli.use.cpu import decode_threads
from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks import load_experiment
from bitnet_cli.use.loading import LoadedModel
from bitnet_cli.nn.model import generate


@dataclass
class Sampling:
    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int = 256

    def validate(self, vocab_size: int) -> None:
        check_sampling(self.temperature, self.top_k, self.top_p, self.max_new_tokens)
        if self.top_k is not None and self.top_k > vocab_size:
            raise BitnetError(f"--top-k must be a whole number from 1 to {vocab_size:,} (the "
                              f"model's vocabulary), got {self.top_k}")


def default_temperature(task) -> float:
    """A reply's temperature where nothing sets it: greedy for the problem solvers (one answer
    is right), 0.8 for text models."""
    from bitnet_cli.tasks.problems import ProblemTask
    return 0.0 if isinstance(task, ProblemTask) else 0.8


SHORT_ALPHABET = 64  # a vocabulary of at most this many single characters is named in full


def unreadable_prompt(text: str, tokenizer) -> str:
    """Why a prompt gave no token at all: it is empty, or none of its characters is in the
    model's vocabulary (a tokenizer without byte fallback drops them)."""
    if not text.strip():
        return "the prompt is empty"
    alphabet = sorted({token for token in tokenizer.get_vocab()
                       if len(token) == 1 and token.isprintable()})
    known = (f"; it knows only {''.join(alphabet)!r}"
             if 0 < len(alphabet) <= SHORT_ALPHABET else "")
    return f"none of the prompt's characters is in this model's vocabulary{known}"


@dataclass
class ReplyStats:
    tokens: int = 0  # of the reply, a stop token not counted
    made: int = 0  # tokens the model made, a stop token counted
    seconds: float = 0.0
    first_token_s: float = 0.0  # from the reply's start to its first token: the prompt's pass
    threads: int = 0
    stopped: str = ""  # "stop token", "length", "context" or "interrupted"

    @property
    def tokens_per_s(self) -> float:
        """The decoding speed: tokens after the first, over the time after the first (0 when
        there was only one)."""
        decoding = self.seconds - self.first_token_s
        return (self.made - 1) / decoding if self.made > 1 and decoding > 0 else 0.0


@dataclass
class ChatSession:
    loaded: LoadedModel
    sampling: Sampling = field(default_factory=Sampling)
    seed: int | None = None
    compile: bool = False  # compile the one-token step, where it is not fused (decoding.DecodeStep)
    notice: Callable[[str], None] = lambda line: None
    raw: bool = False  # continue plain text even where the model has a chat template

    def __post_init__(self):
        self.sampling.validate(self.loaded.config.vocab_size)
        check_sampling(seed=self.seed)
        self.task = load_experiment(self.loaded.experiment)
        self.tokenizer = self.loaded.tokenizer
        self.context = self.loaded.config.max_position_embeddings
        self.turns: list[list[int]] = []  # each earlier prompt with its reply, oldest first
        # An imported chat model's turns go through its template, as messages.
        self.template = None if self.raw else self.loaded.chat
        self.messages: list[dict[str, str]] = []
        self.generator: torch.Generator | None = None  # see sampler()
        self.last = ReplyStats()
        model = self.loaded.model
        on_cpu = model is not None and model.rope_cos.device.type == "cpu"
        self.step = DecodeStep(model, self.compile, self.notice) if model is not None else None
        compiled = self.compile and self.step is not None and not self.step.fused
        if self.compile and not compiled and self.step is not None:
            self.notice(f"--compile is not needed: the {self.loaded.engine} engine decodes "
                        "through its fused step, faster than a compiled one")
        # Threads follow the idle cores reply by reply; a compiled step keeps the count it was
        # compiled with (its kernels are built for it), so that is chosen once, here.
        self.most_threads = torch.get_num_threads() if on_cpu and not compiled else 0
        if on_cpu and compiled:
            torch.set_num_threads(decode_threads(torch.get_num_threads()))
        self.autocast = autocast_for(model.rope_cos.device) if model is not None else nullcontext
        if compiled:
            self.notice("compiling the decode step (seconds; once per chat)")
            self.step.warm_up()

    @property
    def keeps_history(self) -> bool:
        """Text models continue the whole conversation; a problem solver answers each alone."""
        return not hasattr(self.task, "chat_prompt")

    def reset(self) -> None:
        self.turns, self.messages = [], []

    def templated_prompt(self, text: str) -> list[int]:
        """The conversation so far and `text` as the chat template formats them, its oldest
        exchanges left out until a reply has room (as recent_history does)."""
        user = {"role": "user", "content": text}
        room = min(self.sampling.max_new_tokens, self.context // 4)
        history = list(self.messages)
        while True:
            rendered = self.template.render(history + [user])
            ids = self.tokenizer.encode(rendered, add_special_tokens=False).ids
            if len(ids) + room <= self.context or not history:
                break
            history = history[2:]  # the oldest question and its answer
        if len(ids) >= self.context:
            raise BitnetError(f"the prompt is {len(ids)} tokens in the chat template, but this "
                              f"model reads at most {self.context}; shorten it")
        return ids

    def recent_history(self, prompt_len: int) -> list[int]:
        """The most recent whole turns that fit beside the prompt, leaving a reply room of a
        quarter of the context (or max_new_tokens, if smaller); the reply may use what is left."""
        room = self.context - prompt_len - min(self.sampling.max_new_tokens, self.context // 4)
        kept: list[int] = []
        for turn in reversed(self.turns):
            if len(kept) + len(turn) > room:
                break
            kept = turn + kept
        return kept

    def encode_prompt(self, text: str) -> list[int]:
        model_text = self.task.chat_prompt(text) if hasattr(self.task, "chat_prompt") else text
        ids = self.tokenizer.encode(model_text).ids
        if not ids:
            raise BitnetError(unreadable_prompt(text, self.tokenizer))
        if len(ids) >= self.context:
            raise BitnetError(f"the prompt is {len(ids)} tokens, but this model reads at most "
                              f"{self.context}; shorten it")
        return ids

    def sampler(self) -> torch.Generator | None:
        """The seeded generator of every reply's sampling, on the model's device, where the
        logits are drawn from (None without --seed: fresh randomness)."""
        if self.generator is None and self.seed is not None:
            device = self.loaded.model.rope_cos.device
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def reply(self, text: str) -> Iterator[str]:
        """Yield the reply as text pieces while it is generated. Stop it by closing the
        generator (KeyboardInterrupt in the caller does that); what was said stays in history."""
        question = text
        if self.template is not None:
            turn, prompt = [], self.templated_prompt(question)
        else:
            turn = self.encode_prompt(text)
            prompt = self.recent_history(len(turn)) + turn if self.keeps_history else turn
        max_new = min(self.sampling.max_new_tokens, self.context - len(prompt))
        stop_ids = self.loaded.stop_ids or tuple(self.task.stop_ids(self.tokenizer))
        new: list[int] = []
        text = IncrementalText(self.tokenizer)
        self.last = ReplyStats(stopped="length")
        if self.most_threads:
            torch.set_num_threads(decode_threads(self.most_threads))
        if self.loaded.model is not None and self.loaded.model.rope_cos.device.type == "cpu":
            self.last.threads = torch.get_num_threads()
        start = time.perf_counter()
        try:
            with self.autocast():  # bf16 on a GPU, as training and eval run
                for token in generate(self.loaded.model, prompt, max_new,
                                      self.sampling.temperature, self.sampling.top_k,
                                      self.sampling.top_p, stop_ids, generator=self.sampler(),
                                      step=self.step):
                    self.last.made += 1
                    if self.last.made == 1:
                        self.last.first_token_s = time.perf_counter() - start
                    if token in stop_ids:
                        self.last.stopped = "stop token"
                        break
                    new.append(token)
                    if hasattr(self.task, "chat_reply"):
                        continue  # a formatted answer is only shown whole
                    piece = text.add(token)
                    if piece:
                        yield piece
                else:
                    if len(prompt) + len(new) >= self.context:
                        self.last.stopped = "context"
        except (GeneratorExit, KeyboardInterrupt):  # closed by the reader, or Ctrl-C
            self.last.stopped = "interrupted"
            raise
        finally:
            self.last.tokens = len(new)
            self.last.seconds = time.perf_counter() - start
            if self.template is not None:
                self.messages += [{"role": "user", "content": question},
                                  {"role": "assistant", "content": self.tokenizer.decode(new)}]
            elif self.keeps_history:
                self.turns.append(turn + new)
        if hasattr(self.task, "chat_reply"):
            yield self.task.chat_reply(self.tokenizer.decode(new))
        elif rest := text.rest():
            yield rest


class IncrementalText:
    """A reply's text as its tokens arrive, decoding only the tokens since the last whole
    piece instead of the whole reply at every token. A token that ends inside a UTF-8
    character (byte-level BPE splits them) is held back until the character is whole."""

    TAIL = 8  # tokens decoded again with each new one, so that joins decode as they would whole

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []  # since `start`, the last tokens already shown among them
        self.shown = 0  # characters of decode(self.tokens) already given out

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.shown = text[self.shown:], len(text)
        if len(self.tokens) > 2 * self.TAIL:  # keep a short tail: decode cost stays flat
            kept = self.tokens[-self.TAIL:]
            self.tokens, self.shown = kept, len(self.tokenizer.decode(kept))
        return piece

    def rest(self) -> str:
        """What is left at the end: a held-back partial character, as the tokenizer shows it."""
        return self.tokenizer.decode(self.tokens)[self.shown:]
