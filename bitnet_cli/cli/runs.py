"""`bitnet resume`, `bitnet status`, `bitnet plot`: runs you can trust and watch.

status and plot import no torch: they answer instantly, even beside a training run."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from bitnet_cli.cli import app, friendly
from bitnet_cli.errors import BitnetError

RUN_HELP = "A run id, a unique prefix of one, 'latest', or a path to a run folder."


@app.command(rich_help_panel="Training")
@friendly
def resume(
    run: str = typer.Argument(..., help=RUN_HELP, show_default=False),
    steps: Optional[int] = typer.Option(None, help="New total number of steps; more than "
                                                   "planned extends the run (see below)."),
    nproc_per_node: Optional[str] = typer.Option(
        None, help="Worker processes on this machine (default: as many as the run last used, "
                   "if it ran on one machine). Any number continues the same run: the batch "
                   "is global.", show_default=False),
) -> None:
    """Continue a run from its newest good checkpoint, exactly where it stopped.

    Model, optimizer, learning-rate schedule, step, data position and every random state come
    back, so on CPU the resumed run follows the uninterrupted trajectory bit for bit. Metrics
    logged after that checkpoint are dropped and trained again, so metrics.jsonl holds each
    step once. A damaged newest checkpoint is skipped for the one before it.

    --steps N past the planned total extends the run, finished or not: the planned steps keep
    their schedule, and from the planned end the learning rate re-warms linearly over the
    warmup steps (at most half the extension) from the rate the plan ended at to the stage-two
    starting rate, then anneals again to N; weight decay stays 0. A smaller N, still above the steps done,
    ends the current schedule at N instead.
    """
    from bitnet_cli import dist
    from bitnet_cli.cli.train import parse_nproc, train_with_view
    from bitnet_cli.runs import resolve_run, run_lock
    from bitnet_cli.run_setup import last_world_size, prepare_resume

    nproc = parse_nproc(nproc_per_node)
    share = dist.current()
    if share.distributed:  # under torchrun: rank 0 checks and extends the run, all train it
        if nproc is not None:
            raise BitnetError("--nproc-per-node starts the workers itself; under torchrun, "
                              "leave it out and use torchrun's own --nproc-per-node")

        def prepare() -> str:
            run_dir = resolve_run(run)
            with run_lock(run_dir):
                prepare_resume(run_dir, steps, share)
            return str(run_dir)

        train_with_view(Path(dist.main_first(share, prepare)))
        return
    run_dir = resolve_run(run)
    nproc = nproc or last_world_size(run_dir)
    # One writer per run: a second resume (or --steps change) of a run being trained is refused
    # before anything is written. With workers, rank 0 takes the lock over for the training.
    with run_lock(run_dir):
        prepare_resume(run_dir, steps, dist.on_this_machine(nproc))
        if nproc == 1:
            train_with_view(run_dir)
            return
    train_with_view(run_dir, nproc)


@app.command(rich_help_panel="Watching")
@friendly
def status(
    run: Optional[str] = typer.Argument(None, help=RUN_HELP + " Without it: every run.",
                                        show_default=False),
    watch: bool = typer.Option(False, "--watch", help="Refresh live until Ctrl-C."),
    json: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
    interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch.", min=0.1),
) -> None:
    """Show how every run is doing, or one run in detail.

    A run's state is running, finished, interrupted (Ctrl-C or SIGTERM, with a checkpoint),
    failed (an error), or crashed: state.json says running but its process is gone (killed,
    out of memory, power loss). Resume any but a running one with `bitnet resume RUN`.
    """
    from bitnet_cli.runs import resolve_run
    from bitnet_cli import summary

    if watch and json:
        raise BitnetError("--watch and --json do not go together; use --json alone and poll")
    run_dir = resolve_run(run) if run else None

    def snapshot():
        return summary.detail(run_dir) if run_dir else summary.summarize_all()

    if json:
        from bitnet_cli.files import to_json
        typer.echo(to_json(snapshot()))
        return
    from bitnet_cli import ui

    def render(data):
        if run_dir:
            return ui.run_detail(data)
        if not data:
            from bitnet_cli.runs import runs_dir
            return f"no runs in {runs_dir()} yet; start one with `bitnet train simple`"
        return ui.runs_table(data)

    if not watch:
        ui.stdout.print(render(snapshot()))
        return
    from rich.live import Live
    try:
        with Live(render(snapshot()), console=ui.stdout, auto_refresh=False,
                  screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(render(snapshot()), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a watch ends


@app.command(rich_help_panel="Watching")
@friendly
def plot(
    runs: List[str] = typer.Argument(..., help="One or more runs to draw on one figure.",
                                     show_default=False),
    out: Optional[Path] = typer.Option(None, help="Write a .png, .svg or .pdf here instead of "
                                                  "drawing in the terminal."),
    metric: Optional[str] = typer.Option(None, help="Draw this metric instead of the loss curves "
                                                    "(lr, grad_norm, tok_per_s, acc/+, ...)."),
) -> None:
    """Draw loss curves for one or more runs: raw and smoothed train loss, eval loss, and the
    experiment's eval metric (accuracy for arithmetic).

    Several runs share one figure, for example a BitNet run beside its --quant none twin:

      bitnet plot ternary full-precision --out curves.png
    """
    from bitnet_cli import plot as plotting
    from bitnet_cli.runs import resolve_run

    if out is not None:
        plotting.check_out_path(out)
    collected = [plotting.collect(resolve_run(r), metric) for r in runs]
    if out is not None:
        path = plotting.write_figure(collected, out)
        typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", err=True)
        return
    from bitnet_cli import ui
    panels = list(dict.fromkeys(name for run in collected for name in run["panels"]))
    for panel in panels:
        series = [(f"{run['run_id']}: {label}" if len(collected) > 1 else label, pts)
                  for run in collected for label, pts in run["panels"].get(panel, {}).items()
                  if pts and label != "train loss"]
        ui.stdout.print(f"[bold]{panel}[/]")
        ui.stdout.print(ui.terminal_chart(series, width=min(100, ui.stdout.width - 12),
                                          log_y=panel == "loss"))
