"""The rules engine, the perfect player, and the games the tictactoe experiment trains on."""

import functools
import json

import numpy as np
import pytest
import torch

from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.problems import IGNORE
from bitnet_cli.tasks.tictactoe import MIXTURE, game_text, sample_game
from bitnet_cli.tasks.tictactoe_rules import (DRAW, LINES, START, IllegalMove, best_moves, legal_moves,
                                  noisy_player, parse_move, perfect_player, place, play_game,
                                  random_player, reachable_positions, replay, result,
                                  teacher_player, to_move, value, winner)


def board_with(marks: dict[int, str]) -> str:
    return "".join(marks.get(i, ".") for i in range(9))


@pytest.mark.parametrize("line", LINES)
@pytest.mark.parametrize("mark", "XO")
def test_every_line_wins(line, mark):
    board = board_with({i: mark for i in line})
    assert winner(board) == mark and result(board) == mark
    assert legal_moves(board) == []
    with pytest.raises(IllegalMove, match="over"):
        place(board, next(i + 1 for i in range(9) if i not in line))


def test_the_eight_lines_are_the_rows_columns_and_diagonals():
    cells = {tuple(sorted(line)) for line in LINES}
    expected = {(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8),
                (2, 4, 6)}
    assert cells == expected
    # Two in a line, or three not in one, win nothing.
    assert winner(board_with({0: "X", 1: "X"})) is None
    assert winner(board_with({0: "X", 1: "X", 5: "X"})) is None
    assert winner(board_with({0: "X", 1: "O", 2: "X"})) is None


def test_draw_and_game_in_progress():
    full = "XOXXOOOXX"
    assert winner(full) is None and result(full) == DRAW and legal_moves(full) == []
    assert result(START) is None and legal_moves(START) == list(range(1, 10))
    # A line made by the ninth move is a win, not a draw.
    assert result(replay([1, 2, 3, 5, 8, 4, 6, 7, 9])) == "X"


def test_moves_alternate_and_illegal_moves_are_refused():
    board = place(START, 5)
    assert board == "....X...." and to_move(board) == "O"
    board = place(board, 1)
    assert board == "O...X...." and to_move(board) == "X"
    for bad, why in [(5, "taken"), (1, "taken"), (0, "not one of 1-9"), (10, "not one of 1-9"),
                     ("3", "not one of 1-9")]:
        with pytest.raises(IllegalMove, match=why):
            place(board, bad)
    assert legal_moves(board) == [2, 3, 4, 6, 7, 8, 9]


def test_typed_moves_get_hints():
    board = replay([5, 1])
    assert parse_move(board, " 3 \n") == 3
    for text, hint in [("abc", "type the number of a free cell: 2 3 4 6 7 8 9"),
                       ("", "type the number"), ("-1", "type the number"), ("²", "type the number"),
                       ("0", "there is no cell 0"), ("10", "there is no cell 10"),
                       ("9" * 5000, r"there is no cell 9999\.\.\.: cells are numbered 1-9"),
                       ("5", "cell 5 is taken; free cells: 2 3 4 6 7 8 9")]:
        with pytest.raises(IllegalMove, match=hint):
            parse_move(board, text)


def test_every_reachable_position_is_solved():
    positions = reachable_positions()
    assert len(positions) == 5478  # the known count, finished positions included
    assert value(START) == 0  # perfect play from the start is a draw
    for board in positions:
        if result(board) is None:
            assert set(best_moves(board)) <= set(legal_moves(board))


def test_perfect_player_takes_a_win_and_blocks_a_loss():
    assert best_moves(replay([1, 4, 2, 5])) == (3,)  # X completes the top row
    assert best_moves(replay([1, 5, 2])) == (3,)  # O must block the top row
    assert best_moves(replay([1, 2, 5, 3])) == (9,)  # the diagonal, not a slower win
    # Two winning cells are equally good: the perfect player may take either.
    assert set(best_moves(replay([1, 5, 2, 9, 4, 6]))) == {3, 7}


@functools.cache
def perfect_never_loses(board: str, perfect: str) -> bool:
    """True when `perfect`, picking any of its best moves, cannot lose from `board` whatever
    the other side plays."""
    outcome = result(board)
    if outcome is not None:
        return outcome in (perfect, DRAW)
    moves = best_moves(board) if to_move(board) == perfect else legal_moves(board)
    return all(perfect_never_loses(place(board, cell), perfect) for cell in moves)


def test_perfect_player_never_loses_from_any_reachable_position():
    """From every reachable position that is not already lost, against every possible reply."""
    checked = 0
    for board in reachable_positions():
        if result(board) is not None:
            continue
        side = to_move(board)
        if value(board) >= 0:  # not lost already: the perfect side must hold it
            assert perfect_never_loses(board, side), board
            checked += 1
        # And a won position stays won: the opponent can reach nothing better than a loss.
        if value(board) > 0:
            assert all(result(b) == side for b in final_boards(board, side)), board
    assert checked > 3800


def test_the_teacher_plays_one_best_move_in_every_position():
    """The side a model learns from: a best move (so it never loses either), always the same
    one, preferring the centre, then the corners: one right answer to learn per position."""
    rngs = [np.random.default_rng(seed) for seed in range(3)]
    for board in reachable_positions():
        if result(board) is None:
            moves = {teacher_player(board, rng) for rng in rngs}
            assert len(moves) == 1 and moves <= set(best_moves(board)), board
    assert teacher_player(START, rngs[0]) == 5
    assert teacher_player(board_with({4: "X"}), rngs[0]) == 1  # a corner against the centre


@functools.cache
def final_boards(board: str, perfect: str) -> frozenset:
    if result(board) is not None:
        return frozenset([board])
    moves = best_moves(board) if to_move(board) == perfect else legal_moves(board)
    return frozenset().union(*(final_boards(place(board, cell), perfect) for cell in moves))


def test_players_make_legal_moves_and_are_seeded():
    rng = np.random.default_rng(0)
    for x, o in [(random_player, random_player), (perfect_player, noisy_player(0.5)),
                 (noisy_player(1.0), perfect_player)]:
        for _ in range(200):
            moves, outcome = play_game(x, o, rng)
            assert result(replay(moves)) == outcome  # replay raises on any illegal move
    for _ in range(100):  # perfect play from the start is always a draw, along many lines
        assert play_game(perfect_player, perfect_player, rng)[1] == DRAW
    lines = {tuple(play_game(perfect_player, perfect_player, rng)[0]) for _ in range(200)}
    assert len(lines) > 100
    a = [play_game(random_player, random_player, np.random.default_rng(7)) for _ in range(3)]
    b = [play_game(random_player, random_player, np.random.default_rng(7)) for _ in range(3)]
    assert a == b


def test_every_training_game_encodes_without_unknown_tokens():
    task = load_experiment("tictactoe")
    tok = task.tokenizer()
    unk = tok.token_to_id("<unk>")
    rng = np.random.default_rng(1)
    results = set()
    for _ in range(2000):
        moves, outcome, perfect = sample_game(rng)
        text = game_text(moves, outcome)
        ids = tok.encode(text).ids
        assert unk not in ids
        assert ids == task.encode_game(moves, outcome, perfect)[0] and tok.decode(ids) == text
        results.add(outcome)
    assert results == {"X", "O", DRAW}


def test_the_taught_side_of_every_training_game_is_the_teacher():
    rng = np.random.default_rng(3)
    for _ in range(500):
        moves, _, taught = sample_game(rng)
        assert taught in ((True, False), (False, True))
        board = START
        for ply, cell in enumerate(moves):
            if taught[ply % 2]:
                assert cell == teacher_player(board, rng), moves
            board = place(board, cell)


def test_loss_is_on_the_taught_side_and_the_result_only():
    task = load_experiment("tictactoe")
    moves = [5, 1, 9, 3, 2, 8, 4, 6, 7]
    _, learn = task.encode_game(moves, DRAW, (True, True))
    assert learn == [False] + [True] * 9 + [True]  # the start token is never predicted
    _, learn = task.encode_game(moves, DRAW, (True, False))
    assert learn == [False, True, False, True, False, True, False, True, False, True, True]
    _, learn = task.encode_game([1, 5, 2, 3, 9, 7], "O", (False, True))
    assert learn == [False, False, True, False, True, False, True, True]


def test_the_mixture_has_its_proportions():
    rng = np.random.default_rng(2)
    kinds = [sample_game(rng)[2] for _ in range(5000)]
    total = sum(w for w, _, _ in MIXTURE)
    for weight, x, o in MIXTURE:
        assert kinds.count((x, o)) / len(kinds) == pytest.approx(weight / total, abs=0.03)


@pytest.mark.parametrize("seq_len", [10, 40])
def test_stream_rows_hold_whole_games_and_resume_exactly(seq_len):
    task = load_experiment("tictactoe")
    ids = task.ids
    a = task.stream(seed=3, batch_size=16, seq_len=seq_len)
    a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # the data cursor must survive JSON
    expected = a.next_batch()
    b = task.stream(seed=99, batch_size=16, seq_len=seq_len)
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    inputs, labels = expected
    assert inputs.shape == labels.shape == (16, seq_len)
    assert (inputs[:, 0] == ids[">"]).all()  # every row starts at a game's start
    decode = {v: k for k, v in ids.items()}
    for row, row_labels in zip(inputs.tolist(), labels.tolist()):
        text = "".join(decode.get(t, "_") for t in row).rstrip("_")
        games = text.split(">")[1:]
        for n, game in enumerate(games):
            if game[-1] in "XOD":  # a whole game, with the right result
                assert result(replay([int(c) for c in game[:-1]])) == game[-1]
            else:  # only the last game of a full row loses its end to the input/label shift
                assert n == len(games) - 1 and len(text) == seq_len
                replay([int(c) for c in game])  # legal moves all the same
        # A label is the next token where it is learned, and ignored elsewhere.
        for position, label in enumerate(row_labels[:-1]):
            assert label in (IGNORE, row[position + 1])
    assert (labels != IGNORE).any()
    if seq_len > 20:  # a longer context packs several games into a row
        assert (inputs == ids[">"]).sum(dim=1).float().mean() > 2
