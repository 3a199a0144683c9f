"""`bitnet export`, `bitnet bench`: take a model to other runtimes, and measure it."""

from __future__ import annotations

from pathlib import Path

import typer

from bitnet_cli.cli import app, friendly, not_implemented
from bitnet_cli.cli.talk import MODEL_HELP


@app.command(rich_help_panel="Shipping")
@friendly
def export(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False),
    format: str = typer.Option(..., "--format", help="hf, hf-packed or gguf."),
    out: Path = typer.Option(..., "--out", help="Folder to write (must not exist or be empty)."),
) -> None:
    """Export a model for transformers (latent or 2-bit packed weights) or llama.cpp (GGUF)."""
    not_implemented("export")


@app.command(rich_help_panel="Shipping")
@friendly
def bench(json: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """Measure training and inference speed, memory and file sizes, side by side."""
    not_implemented("bench")
