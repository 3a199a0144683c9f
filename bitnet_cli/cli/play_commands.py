"""`bitnet play`, `bitnet eval`: use a trained model."""

from __future__ import annotations

from typing import Optional

import typer

from bitnet_cli.config.settings import DEVICE_HELP
from bitnet_cli.cli.app import ENGINE_HELP, MODEL_HELP, app, complete_run, flag, friendly
from bitnet_cli.errors import BitnetError

@app.command(rich_help_panel="Using a model")
@friendly
def play(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False,
                                autocompletion=complete_run),
    as_: str = typer.Option("x", "--as", help="Play as x (moves first) or o."),
    engine: Optional[str] = typer.Option(None, help=ENGINE_HELP, show_default=False),
    device: str = typer.Option("auto", help=DEVICE_HELP),
) -> None:
    """Play tic-tac-toe against a model trained on the tictactoe experiment.

    The board shows each free cell's number (1-9, row by row from the top left): type one to
    take it. The model answers with its best legal cell; the rules decide who won. If you win,
    the moves of your line are printed: the model answers the same way every time. q or Ctrl-D
    ends the session.
    """
    side = as_.strip().upper()
    if side not in ("X", "O"):
        raise BitnetError(f"--as must be x or o, got {as_!r}")
    from bitnet_cli.cli.play_session import play_session
    play_session(model, side, engine=engine, device=device)


@app.command("eval", rich_help_panel="Using a model")
@friendly
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False,
                                autocompletion=complete_run),
    json: bool = flag("--json", help="Print JSON on stdout."),
    engine: Optional[str] = typer.Option(None, help=ENGINE_HELP, show_default=False),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    data: Optional[str] = typer.Option(None, help="Text models: local .txt, .jsonl or .parquet "
                                                  "files (a 'text' field), or a folder of them, "
                                                  "to measure the held-out loss on instead of "
                                                  "the run's own data (an imported model has "
                                                  "none).", show_default=False),
) -> None:
    """Measure a model on its experiment's held-out task.

    tictactoe: unbeaten, the share of every line any opponent can play against it that it does
    not lose (below 100% it can be beaten); won/drawn/lost over those lines and in 100 games as X
    and 100 as O against a random and a perfect (minimax) player; and how often the model's top
    choice was a legal cell before masking. arithmetic and simple: exact match per
    operator (or group) on held-out problems. Every experiment: held-out loss and perplexity.
    --json prints the same as one JSON object on stdout.
    """
    from bitnet_cli import ui
    from bitnet_cli.ui import tables
    from bitnet_cli.use.evaluation import evaluate_model
    from bitnet_cli.store.files import to_json
    report = evaluate_model(model, device, engine, data)
    for note in report["skipped_checkpoints"]:
        typer.echo(note, err=True)
    if json:
        typer.echo(to_json(report))
    else:
        ui.stdout.print(tables.eval_report(report))
