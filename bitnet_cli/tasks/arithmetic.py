"""Arithmetic: `a op b = r` with + - * and floor division, a in [0, 100], b in [1, 100].

Operands are zero-padded to three digits and the answer is written least significant digit
first ("012+035=74;"): a left-to-right model then produces each digit after the ones it
depends on (the carry), which is what makes the task learnable by a small model.
"""

from __future__ import annotations

import functools
import re

import numpy as np

from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks.problems import ProblemTask

OPERATORS = "+-*/"
A_RANGE, B_RANGE = (0, 100), (1, 100)
HELDOUT_PER_OPERATOR = 1000
HELDOUT_SEED = 20240227  # fixed: the held-out set belongs to the task, not to a run
_NA, _NB = A_RANGE[1] - A_RANGE[0] + 1, B_RANGE[1] - B_RANGE[0] + 1


def solve(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b


def format_prompt(a: int, op: str, b: int) -> str:
    return f"{a:03d}{op}{b:03d}="


def format_answer(result: int) -> str:
    sign = "-" if result < 0 else ""
    return sign + str(abs(result))[::-1] + ";"


def parse_answer(text: str) -> int | None:
    """The inverse of format_answer (the terminator is optional); None if it is not a number."""
    body = text.split(";", 1)[0]
    sign = -1 if body.startswith("-") else 1
    digits = body.lstrip("-")[::-1]
    return sign * int(digits) if digits.isdigit() else None


def _code(a, op_index, b):
    return (op_index * _NA + (a - A_RANGE[0])) * _NB + (b - B_RANGE[0])


# As a person writes a problem: 12+35=, 100 // 7 (the = is optional; / and // both floor-divide).
PROBLEM = re.compile(r"^\s*(\d{1,9})\s*([-+*]|//?)\s*(\d{1,9})\s*=?\s*$")
TRAINED_ON = (f"a from {A_RANGE[0]} to {A_RANGE[1]}, b from {B_RANGE[0]} to {B_RANGE[1]}, "
              "one of + - * // (// and / both floor-divide)")


class ArithmeticTask(ProblemTask):
    alphabet = "0123456789+-*/=;"

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(HELDOUT_SEED)
        self._heldout = []
        self._is_heldout = np.zeros(len(OPERATORS) * _NA * _NB, dtype=bool)
        for op_index, op in enumerate(OPERATORS):
            codes = rng.choice(_NA * _NB, size=HELDOUT_PER_OPERATOR, replace=False)
            for code in sorted(codes):
                a, b = A_RANGE[0] + code // _NB, B_RANGE[0] + code % _NB
                self._is_heldout[_code(a, op_index, b)] = True
                self._heldout.append(self._problem(a, op, b))

    @staticmethod
    @functools.cache  # 40,804 problems in all, drawn over and over
    def _problem(a: int, op: str, b: int) -> tuple[str, str, str]:
        return format_prompt(a, op, b), format_answer(solve(a, op, b)), op

    def heldout(self) -> list[tuple[str, str, str]]:
        return self._heldout

    def chat_prompt(self, text: str) -> str:
        """'12+35=' (as a person writes it) -> '012+035=' (as the model was trained)."""
        match = PROBLEM.match(text)
        if not match:
            raise BitnetError(f"{text.strip()[:40]!r} is not a problem like 12+35= ({TRAINED_ON})")
        a, op, b = int(match.group(1)), match.group(2)[0], int(match.group(3))
        if not (A_RANGE[0] <= a <= A_RANGE[1] and B_RANGE[0] <= b <= B_RANGE[1]):
            raise BitnetError(f"{text.strip()[:40]!r} is outside what the model was trained on "
                              f"({TRAINED_ON}); its answer would be a guess")
        return format_prompt(a, op, b)

    def chat_reply(self, generated: str) -> str:
        value = parse_answer(generated)
        return str(value) if value is not None else generated.split(";", 1)[0]

    def sample(self, rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
        a = rng.integers(A_RANGE[0], A_RANGE[1] + 1, size=n)
        b = rng.integers(B_RANGE[0], B_RANGE[1] + 1, size=n)
        op = rng.integers(0, len(OPERATORS), size=n)
        taken = self._is_heldout[_code(a, op, b)]
        while taken.any():  # redraw held-out problems so they are never trained on
            k = int(taken.sum())
            a[taken] = rng.integers(A_RANGE[0], A_RANGE[1] + 1, size=k)
            b[taken] = rng.integers(B_RANGE[0], B_RANGE[1] + 1, size=k)
            op[taken] = rng.integers(0, len(OPERATORS), size=k)
            taken = self._is_heldout[_code(a, op, b)]
        return [self._problem(x, OPERATORS[o], y) for x, o, y in zip(a.tolist(), op.tolist(),
                                                                      b.tolist())]
