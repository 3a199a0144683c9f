"""Simple: continue the alphabet. "d3=" -> "efg;", wrapping from z to a.

Small enough that a tiny model gets most of it within a minute on a CPU, so a user can see
that training, evaluation and checkpoints work before starting anything long.
"""

from __future__ import annotations

import string

import numpy as np

from bitnet_cli.tasks.problems import ProblemTask

LETTERS = string.ascii_lowercase
MAX_COUNT = 9


def continuation(letter: str, count: int) -> str:
    start = LETTERS.index(letter)
    return "".join(LETTERS[(start + i) % 26] for i in range(1, count + 1))


class AlphabetTask(ProblemTask):
    alphabet = LETTERS + "123456789=;"

    def __init__(self):
        super().__init__()
        # Every fifth (letter, count) pair is held out: 47 of the 234 problems.
        pairs = [(letter, n) for letter in LETTERS for n in range(1, MAX_COUNT + 1)]
        self._heldout_pairs = set(pairs[::5])
        self._training_pairs = [p for p in pairs if p not in self._heldout_pairs]
        self._heldout = [self._problem(letter, n) for letter, n in pairs[::5]]

    @staticmethod
    def _problem(letter: str, count: int) -> tuple[str, str, str]:
        group = "short" if count <= 4 else "long"
        return f"{letter}{count}=", continuation(letter, count) + ";", group

    def heldout(self) -> list[tuple[str, str, str]]:
        return self._heldout

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
        picks = rng.integers(0, len(self._training_pairs), size=n)
        return [self._problem(*self._training_pairs[i]) for i in picks]
