"""`bitnet runs list`, `bitnet runs rm`: the runs folder itself. No torch here."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from bitnet_cli.cli.app import app, complete_run, flag, friendly

runs_app = typer.Typer(help="List or remove runs (the folders under the runs folder).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs", rich_help_panel="Watching")


@runs_app.command("list")
@friendly
def list_runs(
    paths: bool = flag("--paths", help="Print each run's folder instead of its id."),
) -> None:
    """Print every run id, oldest first, one per line (for scripts; `bitnet status` is the table)."""
    from bitnet_cli.store.runs import list_run_dirs
    for run_dir in list_run_dirs():
        typer.echo(str(run_dir) if paths else run_dir.name)


@runs_app.command("rm")
@friendly
def remove(
    runs: List[str] = typer.Argument(..., help="Whole run ids, or paths to run folders in the runs "
                                                  "folder (written with a slash).",
                                     show_default=False, autocompletion=complete_run),
    yes: bool = flag("--yes", "-y", help="Remove without asking."),
) -> None:
    """Delete runs: each run's folder, its checkpoints and metrics, for good.

    Only whole run ids (or run folders) are taken: a prefix or 'latest' could name another run
    than the one you mean. Only folders in the runs folder are deleted, symlinks followed: a run
    folder anywhere else (or a link to one) is refused, and a word is never taken for a folder
    in the current directory. A run being trained is refused; stop it first. Without --yes the
    runs and their sizes are listed and you are asked once.
    """
    from bitnet_cli.store.runs import remove_run
    from bitnet_cli.store.selector import exact_run
    targets = list(dict.fromkeys(exact_run(selector) for selector in runs))
    if not yes:
        for run_dir in targets:
            typer.echo(f"  {run_dir.name}  {_size(run_dir) / 2**20:,.1f} MiB  {run_dir}", err=True)
        try:
            sure = typer.confirm(f"Remove {'these runs' if len(targets) > 1 else 'this run'} "
                                 "for good?", default=False, err=True)
        except typer.Abort:  # the end of input: nothing was agreed to
            sure = False
        if not sure:
            typer.echo("nothing removed", err=True)
            raise typer.Exit(1)
    for run_dir in targets:
        typer.echo(f"removed {remove_run(run_dir)}", err=True)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
