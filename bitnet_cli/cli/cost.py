"""`bitnet cost`: what a training run costs, before you start it."""

from __future__ import annotations

from typing import Optional

import typer

from bitnet_cli.cli import app, friendly, not_implemented


@app.command(rich_help_panel="Planning")
@friendly
def cost(
    params: Optional[str] = typer.Option(None, help="Model size, like 500k, 95M or 1.3B."),
    tokens: Optional[str] = typer.Option(None, help="Training tokens, like 2B."),
    gpu: Optional[str] = typer.Option(None, help="GPU model (default: compare all)."),
    gpus: int = typer.Option(1, help="Number of GPUs."),
    json: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Estimate the FLOPs, hours, dollars and memory of a training run."""
    not_implemented("cost")
