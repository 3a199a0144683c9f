"""`bitnet chat`, `bitnet play`, `bitnet eval`: use a trained model."""

from __future__ import annotations

from typing import Optional

import typer

from bitnet_cli.cli import app, friendly, not_implemented

MODEL_HELP = "A run (id, prefix, 'latest' or folder) or a checkpoint folder."


@app.command(rich_help_panel="Using a model")
@friendly
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    prompt: Optional[str] = typer.Option(None, help="Answer this once, print only the completion, exit."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the K most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Sample among the smallest set of tokens whose "
                                                     "probability adds up to P."),
    max_new_tokens: int = typer.Option(256, help="Longest reply, in tokens."),
) -> None:
    """Talk to a trained model, streaming its reply token by token."""
    not_implemented("chat")


@app.command(rich_help_panel="Using a model")
@friendly
def play(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    as_: str = typer.Option("x", "--as", help="Play as x (moves first) or o."),
) -> None:
    """Play tic-tac-toe against a model trained on the tictactoe experiment."""
    not_implemented("play")


@app.command("eval", rich_help_panel="Using a model")
@friendly
def evaluate(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Measure a model on its experiment's held-out task."""
    not_implemented("eval")
