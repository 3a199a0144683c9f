"""`bitnet resume`, `bitnet status`, `bitnet plot`: runs you can trust and watch."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from bitnet_cli.cli import app, friendly, not_implemented

RUN_HELP = "A run id, a unique prefix of one, 'latest', or a path to a run folder."


@app.command(rich_help_panel="Training")
@friendly
def resume(
    run: str = typer.Argument(..., help=RUN_HELP, show_default=False),
    steps: Optional[int] = typer.Option(None, help="New total number of steps (extends a finished run)."),
) -> None:
    """Continue a run from its newest good checkpoint, exactly where it stopped."""
    not_implemented("resume")


@app.command(rich_help_panel="Watching")
@friendly
def status(
    run: Optional[str] = typer.Argument(None, help=RUN_HELP + " Without it: every run.",
                                        show_default=False),
    watch: bool = typer.Option(False, "--watch", help="Refresh live until Ctrl-C."),
    json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
) -> None:
    """Show how every run is doing, or one run in detail."""
    not_implemented("status")


@app.command(rich_help_panel="Watching")
@friendly
def plot(
    runs: List[str] = typer.Argument(..., help="One or more runs to draw on one figure.",
                                     show_default=False),
    out: Optional[Path] = typer.Option(None, help="Write a PNG or SVG here instead of drawing in "
                                                  "the terminal."),
    metric: Optional[str] = typer.Option(None, help="Metric to draw (default: loss)."),
) -> None:
    """Draw loss curves (and the experiment's eval metric) for one or more runs."""
    not_implemented("plot")
