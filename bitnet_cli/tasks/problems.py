"""Synthetic prompt -> answer tasks on a character vocabulary (shared by simple and arithmetic).

Training rows are problems packed back to back ("012+035=74;045-003=24;..."), each row starting
at a problem boundary. The loss is taken on answer characters only: the prompts are random by
construction, so predicting them is noise that would only dilute the gradient.
Held-out problems are fixed by the task (not the run's seed) and never appear in training.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import Regex

from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.model import evaluation
from bitnet_cli.tasks.rows import RowStream

PAD, UNK = "<pad>", "<unk>"
IGNORE = -100


def char_tokenizer(alphabet: str) -> Tokenizer:
    """A `tokenizers` word-level tokenizer whose words are single characters."""
    vocab = {PAD: 0, UNK: 1}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, UNK])
    return tok


class ProblemTask:
    """Subclasses define `alphabet`, `sample(rng, n)` -> list of (prompt, answer, group) and
    `heldout()` -> the same for the fixed held-out set."""

    alphabet: str = ""
    headline = "acc"
    answer_end = ";"

    def __init__(self):
        self._tokenizer = char_tokenizer(self.alphabet)
        self.char_ids = {ch: self._tokenizer.token_to_id(ch) for ch in self.alphabet}
        self._encoded: dict[tuple[str, str], tuple] = {}

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return [self.char_ids[ch] for ch in text]

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return (tokenizer.token_to_id(self.answer_end),)

    def chat_prompt(self, text: str) -> str:
        """What the user typed, as the model reads a prompt (ends with '=')."""
        text = text.strip().rstrip("=").replace(" ", "") + "="
        unknown = sorted(set(text) - set(self.alphabet))
        if unknown:
            raise BitnetError(f"this model only reads the characters {self.alphabet!r}, "
                              f"not {''.join(unknown)!r}")
        return text

    def chat_reply(self, generated: str) -> str:
        return generated.split(self.answer_end, 1)[0]

    def stream(self, seed: int, batch_size: int, seq_len: int, rank: int = 0,
               world_size: int = 1) -> "ProblemStream":
        return ProblemStream(self, seed, batch_size, seq_len, rank, world_size)

    def encode_problem(self, prompt: str, answer: str) -> tuple[tuple[int, ...], tuple[bool, ...]]:
        """Token ids of prompt+answer, and for each token whether it is to be predicted. Kept
        once made: the same few thousand problems come back in every batch."""
        key = (prompt, answer)
        encoded = self._encoded.get(key)
        if encoded is None:
            ids = tuple(self.encode(prompt + answer))
            encoded = self._encoded[key] = (ids, (False,) * len(prompt) + (True,) * len(answer))
        return encoded

    @evaluation
    def evaluate(self, model, device, autocast=contextlib.nullcontext, chunk: int = 512) -> dict[str, float]:
        """Held-out answer loss and exact match per group.

        Exact match is judged by teacher forcing: the answer is right when the argmax at every
        answer position is the true character. That is exactly when greedy decoding would write
        the whole answer (terminator included), at the cost of one forward pass.
        """
        problems = self.heldout()
        groups = list(dict.fromkeys(g for _, _, g in problems))
        encoded = [self.encode_problem(p, a) for p, a, _ in problems]
        width = max(len(ids) for ids, _ in encoded)
        inputs = torch.zeros(len(encoded), width - 1, dtype=torch.long)
        labels = torch.full((len(encoded), width - 1), IGNORE, dtype=torch.long)
        for row, (ids, target) in enumerate(encoded):
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
            mask = torch.tensor(target[1:])
            labels[row, : len(ids) - 1] = torch.where(mask, torch.tensor(ids[1:]), IGNORE)
        total_loss, total_tokens, correct = 0.0, 0, []
        for start in range(0, len(encoded), chunk):
            x = inputs[start:start + chunk].to(device)
            y = labels[start:start + chunk].to(device)
            with autocast():
                logits = model(x)
            total_loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE,
                                          reduction="sum").item()
            total_tokens += int((y != IGNORE).sum())
            hit = (logits.argmax(-1) == y) | (y == IGNORE)
            correct.append(hit.all(dim=1).cpu())
        correct = torch.cat(correct)
        metrics = {"loss": total_loss / max(total_tokens, 1), "acc": correct.float().mean().item()}
        for group in groups:
            rows = torch.tensor([g == group for _, _, g in problems])
            metrics[f"acc/{group}"] = correct[rows].float().mean().item()
        return metrics


class ProblemStream(RowStream):
    """Rows of problems packed back to back; row n draws its problems from its own generator,
    seeded by (seed, n)."""

    def __init__(self, task: ProblemTask, seed: int, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed, batch_size, rank, world_size)
        self.task, self.seq_len = task, seq_len

    def make_rows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = self.seq_len + 1
        tokens = np.zeros((count, width), dtype=np.int64)
        targets = np.zeros((count, width), dtype=bool)
        for row in range(count):
            rng = np.random.default_rng([self.seed, first + row])
            ids, mask = [], []
            while len(ids) < width:
                # Sample a handful at a time: vectorised sampling, few calls.
                for prompt, answer, _ in self.task.sample(rng, 8):
                    p_ids, p_mask = self.task.encode_problem(prompt, answer)
                    ids += p_ids
                    mask += p_mask
            tokens[row] = ids[:width]
            targets[row] = mask[:width]
        inputs = torch.from_numpy(tokens[:, :-1].copy())
        labels = torch.from_numpy(np.where(targets[:, 1:], tokens[:, 1:], IGNORE))
        return inputs, labels
