"""Natural language: TinyStories (12M) and the FineWeb-Edu baseline (95M), or local text.

The model reads fixed windows of `seq_len + 1` tokens cut from the token shards; each epoch
visits every window once in an order drawn from the seed, so the data cursor is the number of
rows read (see rows.py) and resuming is exact. Evaluation is the held-out loss over a fixed set of
windows, beside the unigram baseline that any learning must beat. `bitnet eval` reads only the
held-out split (prepare_eval), never the training budget.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from bitnet_cli.data.shards import EOT, Progress, Shards, find_shards, held_out_tokens, prepare_shards
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.model import evaluation
from bitnet_cli.tasks.rows import RowStream

EVAL_WINDOWS = 256


class TextTask:
    headline = "loss"

    def __init__(self, name: str):
        self.name = name
        self.shards: Shards | None = None
        self._tokenizer: Tokenizer | None = None

    def prepare(self, data: str | None, vocab_size: int, min_train_tokens: int,
                progress: Progress | None = None, tokenizer: Tokenizer | None = None) -> None:
        """The run's token shards: made with `tokenizer` (a fine-tuned model's) where given,
        else with a BPE of `vocab_size` trained on the data."""
        self.shards = prepare_shards(self.name, data, vocab_size, min_train_tokens, progress,
                                     tokenizer)
        self._tokenizer = Tokenizer.from_file(str(self.shards.tokenizer_path))
        self._val, self._unigram = self.shards.val, self.shards.meta["unigram_loss"]

    def prepare_eval(self, data: str | None, vocab_size: int, min_train_tokens: int,
                     tokenizer: Tokenizer, seq_len: int) -> None:
        """Only what evaluate() reads, for a model trained with `tokenizer` on these arguments:
        the held-out split of the run's cached shards, or when the cache has none, the held-out
        documents encoded with `tokenizer` (without the unigram baseline, which needs the rest)."""
        shards = find_shards(self.name, data, vocab_size, min_train_tokens)
        if shards is None:
            self._val = held_out_tokens(self.name, data, tokenizer, EVAL_WINDOWS * seq_len + 1,
                                        min_train_tokens)
            self._unigram = None
        elif Tokenizer.from_file(str(shards.tokenizer_path)).to_str() != tokenizer.to_str():
            raise BitnetError(f"the data ({data or 'the ' + self.name + ' hub data set'}) no longer "
                              "gives the tokenizer this model was trained with (its files changed "
                              "since); restore them to evaluate it")
        else:
            self._val, self._unigram = shards.val, shards.meta["unigram_loss"]
        self._tokenizer = tokenizer

    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("prepare() the text task before asking for its tokenizer")
        return self._tokenizer

    def stream(self, seed: int, batch_size: int, seq_len: int, rank: int = 0,
               world_size: int = 1) -> "WindowStream":
        return WindowStream(np.asarray(self.shards.train), seed, batch_size, seq_len, rank,
                            world_size)

    @evaluation
    def evaluate(self, model, device, autocast=contextlib.nullcontext, batch_size: int = 32) -> dict:
        seq_len = model.config.max_position_embeddings
        val = np.asarray(self._val)
        windows = min(EVAL_WINDOWS, (len(val) - 1) // seq_len)
        if windows == 0:  # held-out text shorter than one window: score what there is
            seq_len, windows = len(val) - 1, 1
        total, count = 0.0, 0
        for start in range(0, windows, batch_size):
            rows = np.stack([val[i * seq_len:i * seq_len + seq_len + 1]
                             for i in range(start, min(start + batch_size, windows))]).astype(np.int64)
            x = torch.from_numpy(rows[:, :-1]).to(device)
            y = torch.from_numpy(rows[:, 1:]).to(device)
            with autocast():
                logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
            count += y.numel()
        metrics = {"loss": total / count}
        if self._unigram is not None:
            metrics["unigram_loss"] = self._unigram
        return metrics

    def stop_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        return (tokenizer.token_to_id(EOT),)


class WindowStream(RowStream):
    """Row n is window order(epoch)[n % windows] of epoch n // windows."""

    def __init__(self, tokens: np.ndarray, seed: int, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed, batch_size, rank, world_size)
        self.tokens, self.seq_len = tokens, seq_len
        self.windows = (len(tokens) - 1) // seq_len
        if self.windows < batch_size:
            raise BitnetError(f"the training text has {len(tokens):,} tokens: too few for a batch "
                              f"of {batch_size} windows of {seq_len}; use more text, or a smaller "
                              "--batch-size or --seq-len")
        self._order = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = (epoch, rng.permutation(self.windows))
        return self._order[1]

    def make_rows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len
        picks = [self.order(n // self.windows)[n % self.windows] for n in range(first, first + count)]
        rows = np.stack([self.tokens[i * T:i * T + T + 1] for i in picks]).astype(np.int64)
        return torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
