"""`bitnet play` and `bitnet eval`, and the batched games they and training evaluate with."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.cli import app
from bitnet_cli.config.building import build_configs
from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.tictactoe import CELLS, ModelPlayer, play_matches
from bitnet_cli.use.loading import load_player
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.tasks.tictactoe_rules import DRAW, START, best_moves, legal_moves, place, replay, result, to_move
from bitnet_cli.cli.play_session import play_game
from tests.cli import TmuxPane, runner
from tests.models import SHORT_STEPS



@pytest.fixture
def ttt_checkpoint(short_run):
    return short_run("tictactoe") / "checkpoints" / step_dir_name(SHORT_STEPS)


@pytest.fixture
def arithmetic_checkpoint(short_run):
    return short_run("arithmetic") / "checkpoints" / step_dir_name(SHORT_STEPS)


class ScriptedModel(torch.nn.Module):
    """Scores the cells by a rule (moves so far -> {cell: score}) instead of by learning, so
    the evaluator can be checked against known play."""

    def __init__(self, rule):
        super().__init__()
        self.rule = rule
        self.ids = load_experiment("tictactoe").ids
        self.cell_of = {self.ids[c]: int(c) for c in CELLS}

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, len(self.ids) + 2)
        for row, ids in enumerate(input_ids.tolist()):
            for cell, score in self.rule([self.cell_of[i] for i in ids[1:]]).items():
                logits[row, -1, self.ids[str(cell)]] = score
        return logits


def scripted_player(rule):
    return ModelPlayer(ScriptedModel(rule), load_experiment("tictactoe").tokenizer())


def perfect_rule(moves):
    return {best_moves(replay(moves))[0]: 1.0}


def test_the_model_plays_its_best_legal_cell():
    # It likes the centre best, then 9: once the centre is taken it must play 9, and say that
    # its top choice was not legal.
    player = scripted_player(lambda moves: {5: 10.0, 9: 5.0, 1: 1.0})
    assert player.choose([[]]) == ([5], [True])
    assert player.choose([[5], [1]]) == ([9, 5], [False, True])
    # Nothing it likes is free: it still plays a legal cell.
    assert player.choose([[5, 9, 1]])[0][0] in legal_moves(replay([5, 9, 1]))


def test_a_perfect_model_never_loses_and_every_count_adds_up():
    metrics = play_matches(scripted_player(perfect_rule), games=30, seed=0)
    for group in ["random-x", "random-o", "perfect-x", "perfect-o"]:
        counts = [metrics[f"{group}/{k}"] for k in ("won", "drawn", "lost")]
        assert sum(counts) == 30 and counts[2] == 0
        assert metrics[f"not_lost/{group}"] == 1.0
    assert metrics["perfect-x/drawn"] == metrics["perfect-o/drawn"] == 30
    assert metrics["random-x/won"] > 20  # a perfect X beats a random O almost always
    assert metrics["not_lost"] == 1.0 and metrics["legal"] == 1.0
    assert metrics["unbeaten"] == metrics["unbeaten/x"] == metrics["unbeaten/o"] == 1.0
    assert play_matches(scripted_player(perfect_rule), games=30, seed=0) == metrics


def test_a_bad_model_loses_and_its_illegal_wishes_are_counted():
    # Always wants cell 1, then the lowest free cell: beaten by the perfect player.
    def rule(moves):
        return {1: 9.0, **{cell: 8.0 - cell * 0.1 for cell in legal_moves(replay(moves))}}
    metrics = play_matches(scripted_player(rule), games=20, seed=1)
    assert metrics["perfect-x/lost"] + metrics["perfect-o/lost"] > 0
    assert metrics["not_lost"] < 1
    assert 0 < metrics["legal"] < 0.5  # after the first move cell 1 is always taken
    # The headline counts every line: one lost line of hundreds and it is short of 1.
    lines = sum(metrics[f"every-{side}/{k}"] for side in "xo" for k in ("won", "drawn", "lost"))
    lost = metrics["every-x/lost"] + metrics["every-o/lost"]
    assert lost > 0 and metrics["unbeaten"] == 1 - lost / lines


def test_evaluate_plays_a_fixed_set_of_games():
    task = load_experiment("tictactoe")
    model_cfg, _ = build_configs("tictactoe", "tiny")
    model_cfg.vocab_size = task.tokenizer().get_vocab_size()
    torch.manual_seed(0)
    model = BitNetForCausalLM(model_cfg)
    first = task.evaluate(model, "cpu")
    assert first == task.evaluate(model, "cpu")
    assert first["loss"] > 0 and 0 <= first["legal"] <= 1 and model.training
    for group in ["random-x", "random-o", "perfect-x", "perfect-o"]:
        assert sum(first[f"{group}/{k}"] for k in ("won", "drawn", "lost")) == 100
    assert first["perfect-x/won"] == first["perfect-o/won"] == 0  # nobody beats minimax


def test_eval_json_for_tictactoe(ttt_checkpoint):
    result = runner.invoke(app, ["eval", str(ttt_checkpoint), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert report["experiment"] == "tictactoe" and report["step"] == SHORT_STEPS
    metrics = report["metrics"]
    for group in ["random-x", "random-o", "perfect-x", "perfect-o"]:
        assert sum(metrics[f"{group}/{k}"] for k in ("won", "drawn", "lost")) == 100
    assert {"legal", "not_lost", "loss", "ppl"} <= metrics.keys()
    shown = runner.invoke(app, ["eval", str(ttt_checkpoint)])
    assert shown.exit_code == 0 and "perfect" in shown.stdout and "legal" in shown.stdout


def test_eval_reports_arithmetic_accuracy_per_operator(arithmetic_checkpoint):
    result = runner.invoke(app, ["eval", str(arithmetic_checkpoint), "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    metrics = json.loads(result.stdout)["metrics"]
    assert {"acc/+", "acc/-", "acc/*", "acc//", "acc", "loss", "ppl"} <= metrics.keys()
    shown = runner.invoke(app, ["eval", str(arithmetic_checkpoint)])
    assert shown.exit_code == 0 and "acc/*" in shown.stdout


def test_eval_of_nothing_is_one_line(bitnet_home):
    result = runner.invoke(app, ["eval", "nope", "--json"])
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


def expected_game(checkpoint, person, person_moves):
    """The game a person who always takes the lowest free cell plays against the model, worked
    out in-process: the moves the person will type, and the result."""
    player, _ = load_player(str(checkpoint))
    board, moves, typed = START, [], []
    while result(board) is None:
        if to_move(board) == person:
            cell = person_moves(board)
            typed.append(cell)
        else:
            (cell,), _ = player.choose([moves])
        board, moves = place(board, cell), moves + [cell]
    return typed, result(board)


def result_message(person, outcome):
    return "Draw." if outcome == DRAW else ("You win" if outcome == person else "The model wins")


def play(checkpoint, *args, stdin):
    """`bitnet play` in-process, typed into through stdin; the result as a finished process."""
    result = runner.invoke(app, ["play", str(checkpoint), *args], input=stdin)
    return subprocess.CompletedProcess(["bitnet", "play"], result.exit_code, result.stdout,
                                       result.stderr)


@pytest.mark.parametrize("person", ["X", "O"])
def test_play_a_whole_game_through_stdin(ttt_checkpoint, person):
    typed, outcome = expected_game(ttt_checkpoint, person, lambda b: legal_moves(b)[0])
    # Input that must be refused comes first, and does not end the game.
    lines = ["abc", "0", "10"] + [str(cell) for cell in typed]
    done = play(ttt_checkpoint, "--as", person.lower(), stdin="\n".join(lines) + "\nn\n")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "type the number of a free cell" in out
    assert "there is no cell 0" in out and "there is no cell 10" in out
    assert out.count("Your move") == len(typed) + 3
    assert result_message(person, outcome) in out
    assert out.rstrip().endswith("Play again? (y/n)")


def test_a_taken_cell_is_refused_and_play_again_starts_a_new_game_with_a_tally(ttt_checkpoint):
    typed, outcome = expected_game(ttt_checkpoint, "O", lambda b: legal_moves(b)[0])
    player, _ = load_player(str(ttt_checkpoint))
    (model_cell,), _ = player.choose([[]])  # the model's opening: typing it must be refused
    lines = [str(model_cell)] + [str(c) for c in typed] + ["y"] + [str(c) for c in typed] + ["n"]
    done = play(ttt_checkpoint, "--as", "o", stdin="\n".join(lines) + "\n")
    assert done.returncode == 0, done.stderr
    assert f"cell {model_cell} is taken" in done.stdout
    assert done.stdout.count(result_message("O", outcome)) == 2
    assert done.stdout.count("Play again?") == 2
    key = {DRAW: "drawn", "O": "you won", "X": "the model won"}[outcome]
    tallies = [line for line in done.stdout.splitlines() if line.startswith("Games so far:")]
    assert len(tallies) == 2 and f"{key} 1" in tallies[0] and f"{key} 2" in tallies[1], tallies


def test_a_win_names_the_line_that_beats_the_model():
    class Console:  # what play_game reads and prints, without a terminal
        def __init__(self, typed):
            self.typed, self.printed = iter(typed), []

        def print(self, *parts):
            self.printed += [str(part) for part in parts]

        def input(self, prompt):
            return next(self.typed)
    # The model takes the lowest free cell: X at 5, 3, 7 makes a diagonal.
    console = Console(["5", "3", "7"])
    lowest = scripted_player(lambda moves: {cell: -cell for cell in legal_moves(replay(moves))})
    assert play_game(lowest, "X", console) == "X"
    assert "beats this model, every time it is played: 5 1 3 2 7" in console.printed[-1]


def test_end_of_input_ends_play_cleanly(ttt_checkpoint):
    done = play(ttt_checkpoint, stdin="")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "Your move (X)" in done.stdout


def test_play_refuses_a_model_of_another_experiment(arithmetic_checkpoint):
    done = play(arithmetic_checkpoint, stdin="5\n")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "is not a tic-tac-toe model (it was trained on arithmetic)" in done.stderr


def test_play_refuses_a_side_that_does_not_exist(ttt_checkpoint):
    result = runner.invoke(app, ["play", str(ttt_checkpoint), "--as", "z"])
    assert result.exit_code == 1 and "--as must be x or o" in result.stderr


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_play_in_a_real_terminal_under_tmux(ttt_checkpoint, tmp_path):
    typed, outcome = expected_game(ttt_checkpoint, "X", lambda b: legal_moves(b)[-1])
    command = f"{sys.executable} -m bitnet_cli play {ttt_checkpoint}; echo EXIT=$?; sleep 60"
    with TmuxPane(command, tmp_path) as pane:
        for n, cell in enumerate(typed, start=1):
            pane.wait_for("Your move (X)", n)
            pane.send(str(cell), "Enter")
        pane.wait_for("Play again?")
        pane.send("n", "Enter")
        screen = pane.wait_for("EXIT=0")
        assert result_message("X", outcome) in screen


@pytest.mark.slow
def test_tictactoe_tiny_learns_to_play(bitnet_home):
    """The README's command, as a user runs it, then `bitnet eval` on what it left."""
    trained = runner.invoke(app, ["train", "tictactoe", "--size", "tiny"])
    assert trained.exit_code == 0, trained.stderr
    evaluated = runner.invoke(app, ["eval", "latest", "--json"])
    assert evaluated.exit_code == 0, evaluated.stderr
    metrics = json.loads(evaluated.stdout)["metrics"]
    # Unbeatable: no line any opponent can play beats it, as X or as O (so neither the random
    # nor the perfect player can); seeds 1-5 and the default all do this (README).
    assert metrics["every-x/lost"] == metrics["every-o/lost"] == 0, metrics
    assert metrics["unbeaten"] == 1.0, metrics
    assert metrics["random-x/lost"] == metrics["random-o/lost"] == 0, metrics
    assert metrics["perfect-x/drawn"] == metrics["perfect-o/drawn"] == 100, metrics
    assert metrics["legal"] >= 0.99, metrics
