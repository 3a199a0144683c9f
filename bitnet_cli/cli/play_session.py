"""`bitnet play`: a person against a model at tic-tac-toe, in the terminal.

The rules engine keeps the board and decides every result; the model only proposes its best
legal cell. Moves are read as lines from stdin, so a script can play as well as a person, and
the end of input (Ctrl-D) ends the session cleanly.
"""

from __future__ import annotations

from bitnet_cli import ui
from bitnet_cli.cli.app import line_editing
from bitnet_cli.ui.charts import board_text
from bitnet_cli.tasks.tictactoe_rules import DRAW, START, IllegalMove, parse_move, place, result, to_move

QUIT = ("q", "quit", "exit")


def play_session(selector: str, person: str, console=ui.stdout, engine: str | None = None,
                 device: str = "auto") -> None:
    """Games until the person declines another, quits, or input ends. `person` is "X" or "O"."""
    from bitnet_cli.use.loading import load_player

    player, loaded = load_player(selector, engine, device)
    for note in loaded.notes:
        ui.stderr.print(note, markup=False)
    console.print(f"Playing {loaded.checkpoint} (step {loaded.step}, {loaded.engine} engine). "
                  f"You are {person}; X moves first. Type a cell's number to take it; q quits.")
    line_editing()
    tally = {"you": 0, "the model": 0, "drawn": 0}
    while (outcome := play_game(player, person, console)) is not None:
        tally["drawn" if outcome == DRAW else "you" if outcome == person else "the model"] += 1
        console.print("Games so far: " + ", ".join(
            f"{who} {'won ' if who != 'drawn' else ''}{count}" for who, count in tally.items()))
        try:
            again = console.input("Play again? (y/n) ").strip().lower()
        except EOFError:
            console.print()
            return
        if again not in ("y", "yes", ""):
            return


def play_game(player, person: str, console) -> str | None:
    """One game to its end, and its result (X, O or DRAW); None if the person quits or input
    ends first."""
    board, moves = START, []
    while result(board) is None:
        if to_move(board) == person:
            console.print(board_text(board))
            cell = read_move(board, person, console)
            if cell is None:
                return None
        else:
            (cell,), _ = player.choose([moves])
            console.print(f"The model ({to_move(board)}) takes cell {cell}.")
        board, moves = place(board, cell), moves + [cell]
    console.print(board_text(board))
    outcome = result(board)
    if outcome == DRAW:
        console.print("[bold]Draw.[/]")
    elif outcome == person:
        # The model plays the same move in the same position every time: this line always wins.
        console.print(f"[bold green]You win[/] ({person} has a line): you found a line that "
                      f"beats this model, every time it is played: {' '.join(map(str, moves))} "
                      "(the cells in the order played).")
    else:
        console.print(f"[bold red]The model wins[/] ({outcome} has a line).")
    return outcome


def read_move(board: str, person: str, console) -> int | None:
    """The person's cell, asking again after a hint until it is a free one; None to stop."""
    while True:
        try:
            text = console.input(f"Your move ({person}): ")
        except EOFError:
            console.print()
            return None
        if text.strip().lower() in QUIT:
            return None
        try:
            return parse_move(board, text)
        except IllegalMove as e:
            console.print(f"[yellow]{e}[/]")
