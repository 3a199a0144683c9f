"""Tic-tac-toe: games as token sequences, made on the fly, and a model judged by playing.

A game is written ">" (start), one token per move (the cell, 1-9), then the result: "X" or "O"
for the winner, "D" for a draw. ">5193..." reads: X took the centre, O the top left, and so on.
Every row of a batch starts at a game's ">", holds whole games only, and is padded with <pad>.

The games are drawn afresh from the run's seed (MIXTURE): the teacher (a perfect player with one
fixed choice among equally good moves) as X or as O, against a noisy opponent: a perfect player
that plays a random move with a probability drawn per game, from none (how to hold a draw) to
always (the odd positions a random or human opponent creates, and how to punish them). The loss
is taken only on the teacher's moves and on the result: the opponent's moves are what the model
must answer, never what it should imitate.

The model plays its highest-scoring legal cell (see `ModelPlayer`), so it never makes an illegal
move; how often its unmasked top choice is legal anyway is measured as "legal".
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from bitnet_cli.nn.model import evaluation
from bitnet_cli.tasks.problems import IGNORE, char_tokenizer
from bitnet_cli.tasks.rows import RowStream
from bitnet_cli.tasks.tictactoe_rules import (DRAW, START, legal_moves, noisy_player,
                                              perfect_player, place, play_game, random_player,
                                              replay, result, teacher_player, to_move)

START_TOKEN = ">"
CELLS = "123456789"
ALPHABET = START_TOKEN + CELLS + "XOD"
GAME_TOKENS = 11  # the longest game: start, nine moves, result
SHORTEST_GAME_TOKENS = 7  # start, five moves (X wins on its third), result
# (weight, X is the teacher, O is the teacher) of each kind of game in the training mixture
MIXTURE = ((1, True, False), (1, False, True))
OPPONENTS = {"random": random_player, "perfect": perfect_player}
EVAL_GAMES = 100  # per opponent and side: 400 games in all
EVAL_SEED = 20240301  # fixed: every evaluation of every run meets the same opponents
VALID_GAMES, VALID_SEED = 1000, 20240302


def game_text(moves: list[int], outcome: str) -> str:
    return START_TOKEN + "".join(str(cell) for cell in moves) + outcome


# The mixture's cumulative weights: searchsorted on one uniform draw picks a kind of game as
# rng.choice(p=...) does, draw for draw, without that call's checks of p on every game.
_MIXTURE_CDF = np.cumsum([w for w, _, _ in MIXTURE], dtype=float) / sum(w for w, _, _ in MIXTURE)


def sample_game(rng: np.random.Generator) -> tuple[list[int], str, tuple[bool, bool]]:
    """One game of the mixture: its moves, result, and which sides (X, O) the teacher played."""
    _, x_taught, o_taught = MIXTURE[int(_MIXTURE_CDF.searchsorted(rng.random(), side="right"))]
    noise = rng.random()
    players = [teacher_player if taught else noisy_player(noise) for taught in (x_taught, o_taught)]
    moves, outcome = play_game(*players, rng)
    return moves, outcome, (x_taught, o_taught)


class TicTacToeTask:
    headline = "unbeaten"  # every line an opponent can play, not a sample of them

    def __init__(self):
        self._tokenizer = char_tokenizer(ALPHABET)
        self.ids = {ch: self._tokenizer.token_to_id(ch) for ch in ALPHABET}

    def tokenizer(self):
        return self._tokenizer

    def encode_game(self, moves: list[int], outcome: str,
                    taught: tuple[bool, bool]) -> tuple[list[int], list[bool]]:
        """Token ids of a game, and for each token whether it is to be predicted: the taught
        sides' (X, O) moves and the result."""
        ids = [self.ids[ch] for ch in game_text(moves, outcome)]
        learn = [False] + [taught[ply % 2] for ply in range(len(moves))] + [True]
        return ids, learn

    def stream(self, seed: int, batch_size: int, seq_len: int, rank: int = 0,
               world_size: int = 1) -> "GameStream":
        return GameStream(self, seed, batch_size, seq_len, rank, world_size)

    @evaluation
    def evaluate(self, model, device, autocast=contextlib.nullcontext) -> dict:
        """Validation loss on a fixed sample of the mixture, then games (see play_matches):
        EVAL_GAMES as X and as O against the random and the perfect player, and every line any
        opponent can play. The same seeds every time, so evaluations compare across steps."""
        rng = np.random.default_rng(VALID_SEED)
        tokens = np.zeros((VALID_GAMES, GAME_TOKENS), dtype=np.int64)  # <pad> is id 0
        learn = np.zeros((VALID_GAMES, GAME_TOKENS), dtype=bool)
        for row in range(VALID_GAMES):
            ids, mask = self.encode_game(*sample_game(rng))
            tokens[row, :len(ids)], learn[row, :len(ids)] = ids, mask
        inputs, labels = shift(tokens, learn)
        with autocast():
            logits = model(inputs.to(device))
        metrics = {"loss": F.cross_entropy(logits.flatten(0, 1), labels.to(device).flatten(),
                                           ignore_index=IGNORE).item()}
        metrics.update(play_matches(ModelPlayer(model, self._tokenizer, device, autocast),
                                    EVAL_GAMES, EVAL_SEED))
        return metrics


def shift(tokens: np.ndarray, learn: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token labels, -100 where the next token is not to be learned."""
    inputs = torch.from_numpy(tokens[:, :-1].copy())
    labels = torch.from_numpy(np.where(learn[:, 1:], tokens[:, 1:], IGNORE))
    return inputs, labels


class GameStream(RowStream):
    """Rows of fresh games placed back to back; row n plays its games with its own generator,
    seeded by (seed, n). A game that does not fit at the end of a row is left out."""

    def __init__(self, task: TicTacToeTask, seed: int, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(seed, batch_size, rank, world_size)
        self.task, self.width = task, seq_len + 1

    def make_rows(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.zeros((count, self.width), dtype=np.int64)  # <pad> is id 0
        learn = np.zeros((count, self.width), dtype=bool)
        for row in range(count):
            rng = np.random.default_rng([self.seed, first + row])
            used = 0
            # No game is played once none could fit: the games a row holds come out the same.
            while used == 0 or self.width - used >= SHORTEST_GAME_TOKENS:
                # Only a context shorter than a game (seq_len < 10) ever cuts one short.
                ids, mask = (part[:self.width] for part in self.task.encode_game(*sample_game(rng)))
                if used + len(ids) > self.width:
                    break
                tokens[row, used:used + len(ids)], learn[row, used:used + len(ids)] = ids, mask
                used += len(ids)
        return shift(tokens, learn)


class ModelPlayer:
    """A model's moves: the legal cell it scores highest after the game so far."""

    def __init__(self, model, tokenizer, device="cpu", autocast=contextlib.nullcontext):
        self.model, self.device, self.autocast = model, device, autocast
        self.start = tokenizer.token_to_id(START_TOKEN)
        self.cell_ids = [tokenizer.token_to_id(c) for c in CELLS]
        self.cells = torch.tensor(self.cell_ids, device=device)

    @torch.no_grad()
    def choose(self, games: list[list[int]]) -> tuple[list[int], list[bool]]:
        """For games that have all made the same number of moves (one forward pass for all):
        each one's move, and whether the model's top choice over its whole vocabulary was
        legal, that is, whether the move needed no masking."""
        rows = [[self.start] + [self.cell_ids[cell - 1] for cell in moves] for moves in games]
        with self.autocast():
            logits = self.model(torch.tensor(rows, device=self.device))[:, -1].float()
        legal = torch.zeros(len(games), len(CELLS), dtype=torch.bool, device=self.device)
        for row, moves in enumerate(games):
            legal[row, [cell - 1 for cell in legal_moves(replay(moves))]] = True
        choice = logits[:, self.cells].masked_fill(~legal, float("-inf")).argmax(-1)
        top_legal = logits.argmax(-1) == self.cells[choice]
        return (choice + 1).tolist(), top_legal.tolist()


def play_matches(player: ModelPlayer, games: int, seed: int) -> dict:
    """How the model plays, as counts of won/drawn/lost per "<opponent>-<side>" group:

    random-x, random-o, perfect-x, perfect-o   `games` games each, all played at once
    every-x, every-o                           every line an opponent can lead the model into

    The model is deterministic, so the second kind is a finite tree: it answers each position
    with its one move while the opponent tries every legal move (a few hundred lines in all).
    No lost line there means that no opponent, random or otherwise, can ever beat it.
    Also: the share of each group not lost ("not_lost/random-x", ...), of the sampled games not
    lost ("not_lost"), of every line not lost ("unbeaten", the headline: below 1 the model can be
    beaten; "unbeaten/x", "unbeaten/o" per side), and of all the model's moves whose unmasked top
    choice was legal.
    """
    rng = np.random.default_rng(seed)
    groups = {f"{name}-{side.lower()}": [] for name in OPPONENTS for side in "XO"}
    top_legal = []
    for group in groups:
        name, side = group.split("-")
        groups[group] = sampled_games(player, OPPONENTS[name], side.upper(), games, rng, top_legal)
    for side in "XO":
        groups[f"every-{side.lower()}"] = every_line(player, side, top_legal)
    metrics = {}
    for group, outcomes in groups.items():
        side = group[-1].upper()
        won, drawn = outcomes.count(side), outcomes.count(DRAW)
        metrics.update({f"{group}/won": won, f"{group}/drawn": drawn,
                        f"{group}/lost": len(outcomes) - won - drawn,
                        f"not_lost/{group}": (won + drawn) / len(outcomes)})
    sampled = [g for g in groups if not g.startswith("every")]
    metrics["not_lost"] = sum(metrics[f"not_lost/{g}"] for g in sampled) / len(sampled)
    lost_lines = metrics["every-x/lost"] + metrics["every-o/lost"]
    metrics.update({"unbeaten": 1 - lost_lines / (len(groups["every-x"]) + len(groups["every-o"])),
                    "unbeaten/x": metrics["not_lost/every-x"],
                    "unbeaten/o": metrics["not_lost/every-o"]})
    metrics["legal"] = sum(top_legal) / len(top_legal)
    return metrics


def sampled_games(player: ModelPlayer, opponent, side: str, games: int, rng, top_legal: list):
    """The results of `games` games with the model as `side`, one forward pass per ply."""
    boards, moves = [START] * games, [[] for _ in range(games)]
    while True:
        live = [i for i in range(games) if result(boards[i]) is None]
        if not live:
            break
        if to_move(boards[live[0]]) == side:  # live games have all made the same number of moves
            chosen, legal = player.choose([moves[i] for i in live])
            top_legal += legal
        else:
            chosen = [opponent(boards[i], rng) for i in live]
        for i, cell in zip(live, chosen):
            boards[i], moves[i] = place(boards[i], cell), moves[i] + [cell]
    return [result(board) for board in boards]


def every_line(player: ModelPlayer, side: str, top_legal: list) -> list[str]:
    """The results of every game an opponent can play against the model as `side`."""
    frontier, outcomes = [[]], []
    while frontier:
        if to_move(replay(frontier[0])) == side:  # the frontier's games are all the same length
            chosen, legal = player.choose(frontier)
            top_legal += legal
            children = [moves + [cell] for moves, cell in zip(frontier, chosen)]
        else:
            children = [moves + [cell] for moves in frontier for cell in legal_moves(replay(moves))]
        frontier = []
        for moves in children:
            outcome = result(replay(moves))
            if outcome is None:
                frontier.append(moves)
            else:
                outcomes.append(outcome)
    return outcomes
