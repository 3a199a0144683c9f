"""`bitnet runs list`, `bitnet runs rm`: the runs folder itself. No torch here."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer

from bitnet_cli.cli import app, complete_run, flag, friendly
from bitnet_cli.errors import BitnetError

runs_app = typer.Typer(help="List or remove runs (the folders under the runs folder).",
                       no_args_is_help=True)
app.add_typer(runs_app, name="runs", rich_help_panel="Watching")


@runs_app.command("list")
@friendly
def list_runs(paths: bool = flag("--paths", help="Print each run's folder instead of its id.")) -> None:
    """Print every run id, oldest first, one per line (for scripts; `bitnet status` is the table)."""
    from bitnet_cli.runs import list_run_dirs
    for run_dir in list_run_dirs():
        typer.echo(str(run_dir) if paths else run_dir.name)


@runs_app.command("rm")
@friendly
def remove(
    runs: List[str] = typer.Argument(..., help="Whole run ids, or paths to run folders.",
                                     show_default=False, autocompletion=complete_run),
    yes: bool = flag("--yes", "-y", help="Remove without asking."),
) -> None:
    """Delete runs: each run's folder, its checkpoints and metrics, for good.

    Only whole run ids (or run folders) are taken: a prefix or 'latest' could name another run
    than the one you mean. A run being trained is refused; stop it first. Without --yes the runs
    and their sizes are listed and you are asked once.
    """
    from bitnet_cli.runs import remove_run
    targets = list(dict.fromkeys(run_folder(selector) for selector in runs))
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


def run_folder(selector: str) -> Path:
    """The run a whole id or a run folder's path names; a prefix, 'latest' or a folder inside
    a run is refused, with what it would have meant."""
    from bitnet_cli.runs import CONFIG_FILE, list_run_dirs, runs_dir
    path = Path(selector).expanduser()
    if len(path.parts) > 1 or path.is_absolute() or selector in (".", ".."):
        if not (path / CONFIG_FILE).is_file():
            raise BitnetError(f"{path} is not a run folder (it has no {CONFIG_FILE}); give the "
                              "run's own folder")
        return path.absolute()
    names = {p.name: p for p in list_run_dirs()}
    if selector in names:
        return names[selector]
    similar = [name for name in names if name.startswith(selector)] if selector != "latest" else []
    if selector == "latest" or similar:
        meant = "the newest run" if selector == "latest" else ", ".join(similar[:5])
        raise BitnetError(f"runs rm takes whole run ids, and {selector!r} is not one (it could "
                          f"mean {meant}); `bitnet runs list` prints them")
    raise BitnetError(f"no run {selector!r} in {runs_dir()}; `bitnet runs list` prints the runs")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file() and not f.is_symlink())
