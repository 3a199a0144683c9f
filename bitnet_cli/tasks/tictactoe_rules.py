"""Tic-tac-toe: the rules, and the players a model learns from and is measured against.

A board is a string of 9 characters, "." for an empty cell, read row by row from the top
left; cells are numbered 1-9 in that order, as a person types them. X always moves first, so
whose turn it is follows from the board. Plain Python, no torch: `play` and the tests use it
without loading a model.

The perfect player reads a minimax table of every position reachable from the empty board
(5,478 of them), solved once per process in a fraction of a second. Among equally good moves
it picks at random, so the games it plays cover many lines rather than one; the teacher, the
side a model learns from, always picks the same one.
"""

from __future__ import annotations

import functools

import numpy as np

from bitnet_cli.errors import BitnetError

EMPTY = "."
START = EMPTY * 9
LINES = ((0, 1, 2), (3, 4, 5), (6, 7, 8),  # rows
         (0, 3, 6), (1, 4, 7), (2, 5, 8),  # columns
         (0, 4, 8), (2, 4, 6))             # diagonals
DRAW = "D"  # the result of a full board without a line; "X" or "O" name the winner


class IllegalMove(BitnetError):
    pass


def to_move(board: str) -> str:
    return "X" if board.count("X") == board.count("O") else "O"


def winner(board: str) -> str | None:
    for a, b, c in LINES:
        if board[a] != EMPTY and board[a] == board[b] == board[c]:
            return board[a]
    return None


@functools.cache  # a few thousand boards, asked about at every move of every training game
def result(board: str) -> str | None:
    """"X" or "O" for a win, DRAW for a full board without one, None while the game goes on."""
    return winner(board) or (DRAW if EMPTY not in board else None)


def legal_moves(board: str) -> list[int]:
    if result(board) is not None:
        return []
    return [i + 1 for i, c in enumerate(board) if c == EMPTY]


def place(board: str, cell: int) -> str:
    """The board after the side to move takes `cell` (1-9)."""
    if result(board) is not None:
        raise IllegalMove("the game is over")
    if not (isinstance(cell, int) and 1 <= cell <= 9):
        raise IllegalMove(f"cell {cell!r} is not one of 1-9")
    if board[cell - 1] != EMPTY:
        raise IllegalMove(f"cell {cell} is taken")
    return board[:cell - 1] + to_move(board) + board[cell:]


def parse_move(board: str, text: str) -> int:
    """The cell a person typed, or IllegalMove with a hint of what to type instead."""
    text = text.strip()
    free = " ".join(str(cell) for cell in legal_moves(board))
    if not (text.isascii() and text.isdigit()):
        raise IllegalMove(f"type the number of a free cell: {free}")
    short = len(text) <= 4  # int() refuses digit strings past 4300, and no cell needs more
    cell = int(text) if short else 0
    if not 1 <= cell <= 9:
        raise IllegalMove(f"there is no cell {text if short else text[:4] + '...'}: cells are "
                          f"numbered 1-9, row by row from the top left; free now: {free}")
    if board[cell - 1] != EMPTY:
        raise IllegalMove(f"cell {cell} is taken; free cells: {free}")
    return cell


def replay(moves: list[int]) -> str:
    board = START
    for cell in moves:
        board = place(board, cell)
    return board


@functools.cache
def value(board: str) -> int:
    """The minimax value for the side to move: 0 a draw, positive a win, negative a loss.

    A win counts more the sooner it comes (and a loss less the later), so the perfect player
    takes a win at once and, against a fallible opponent, never dawdles into giving one away.
    """
    over = result(board)
    if over == DRAW:
        return 0
    if over is not None:  # the previous mover made a line: the side to move has lost
        return -(1 + board.count(EMPTY))
    return max(-value(place(board, cell)) for cell in legal_moves(board))


@functools.cache
def best_moves(board: str) -> tuple[int, ...]:
    """Every move that keeps the minimax value of `board` for the side to move."""
    scores = {cell: -value(place(board, cell)) for cell in legal_moves(board)}
    best = max(scores.values())
    return tuple(cell for cell, score in scores.items() if score == best)


def reachable_positions() -> set[str]:
    """Every board that legal play from the empty board can reach, finished ones included."""
    seen, frontier = {START}, [START]
    while frontier:
        board = frontier.pop()
        for cell in legal_moves(board):
            child = place(board, cell)
            if child not in seen:
                seen.add(child)
                frontier.append(child)
    return seen


# Players: (board, rng) -> a legal cell. The rng is a numpy Generator, so games are seeded.

def random_player(board: str, rng: np.random.Generator) -> int:
    moves = legal_moves(board)
    return moves[rng.integers(len(moves))]


def perfect_player(board: str, rng: np.random.Generator) -> int:
    moves = best_moves(board)
    return moves[rng.integers(len(moves))] if len(moves) > 1 else moves[0]


# The teacher's order among equally good moves: the centre, the corners, then the edges.
PREFERENCE = (5, 1, 3, 7, 9, 2, 4, 6, 8)


def teacher_player(board: str, rng: np.random.Generator) -> int:
    """The perfect player a model learns from: of the best moves, always the one it prefers,
    so every position has one right answer. (Learning the perfect player's random choice among
    several spreads the target over them, and a wrong move then needs only a share to top it.)"""
    return min(best_moves(board), key=PREFERENCE.index)


def noisy_player(noise: float):
    """Plays a random legal move with probability `noise`, a perfect one otherwise."""
    def player(board: str, rng: np.random.Generator) -> int:
        if rng.random() < noise:
            return random_player(board, rng)
        return perfect_player(board, rng)
    return player


def play_game(x_player, o_player, rng: np.random.Generator) -> tuple[list[int], str]:
    """The moves of one game and its result."""
    board, moves = START, []
    while result(board) is None:
        player = x_player if to_move(board) == "X" else o_player
        cell = player(board, rng)
        board = place(board, cell)
        moves.append(cell)
    return moves, result(board)
