"""`bitnet status`, `bitnet plot`, `bitnet compare`: runs you can watch.

They import no torch: they answer instantly, even beside a training run."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import List, Optional

import typer

from bitnet_cli.cli.app import RUN_HELP, app, complete_run, flag, friendly
from bitnet_cli.errors import BitnetError


@app.command(rich_help_panel="Watching")
@friendly
def status(
    run: Optional[str] = typer.Argument(None, help=RUN_HELP + " Without it: every run.",
                                        show_default=False, autocompletion=complete_run),
    watch: bool = flag("--watch", help="Refresh live until Ctrl-C."),
    json: bool = flag("--json", help="Print JSON on stdout instead of tables."),
    interval: float = typer.Option(2.0, help="Seconds between refreshes with --watch.", min=0.1),
) -> None:
    """Show how every run is doing, or one run in detail.

    A run's state is running, finished, interrupted (Ctrl-C or SIGTERM, with a checkpoint),
    failed (an error), or crashed: state.json says running but its process is gone (killed,
    out of memory, power loss). Resume any but a running one with `bitnet resume RUN`.
    """
    from bitnet_cli.store.selector import resolve_run
    from bitnet_cli.report import summary

    if watch and json:
        raise BitnetError("--watch and --json do not go together; use --json alone and poll")
    run_dir = resolve_run(run) if run else None

    def snapshot():
        if run_dir and not run_dir.is_dir():  # removed while watched: say so, not a row of None
            raise BitnetError(f"run {run_dir.name} is gone: its folder {run_dir} was removed")
        return summary.detail(run_dir) if run_dir else summary.summarize_all()

    if json:
        from bitnet_cli.store.files import to_json
        typer.echo(to_json(snapshot()))
        return
    from bitnet_cli import ui
    from bitnet_cli.ui import tables

    def render(data):
        if run_dir:
            return tables.run_detail(data)
        if not data:
            from bitnet_cli.store.runs import runs_dir
            return f"no runs in {runs_dir()} yet; start one with `bitnet train simple`"
        return tables.runs_table(data, width=ui.stdout.width)

    if not watch:
        ui.stdout.print(render(snapshot()))
        return
    from rich.live import Live
    # Ctrl-C is how a watch ends. It only sets a flag, checked between drawings, so the
    # interrupt never lands inside Rich's own drawing code (a KeyboardInterrupt there could
    # leave the watch hung on exit); a second Ctrl-C stops at once.
    stop = []

    def on_interrupt(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        with Live(render(snapshot()), console=ui.stdout, auto_refresh=False,
                  screen=False) as live:
            while not stop:
                next_drawing = time.monotonic() + interval
                while not stop and time.monotonic() < next_drawing:
                    time.sleep(min(0.05, max(0.0, next_drawing - time.monotonic())))
                if not stop:
                    live.update(render(snapshot()), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, previous)


@app.command(rich_help_panel="Watching")
@friendly
def plot(
    runs: List[str] = typer.Argument(..., help="One or more runs to draw on one figure. "
                                               + RUN_HELP,
                                     show_default=False, autocompletion=complete_run),
    out: Optional[Path] = typer.Option(None, help="Write a .png, .svg or .pdf here instead of "
                                                  "drawing in the terminal."),
    metric: Optional[str] = typer.Option(None, help="Draw this metric instead of the loss curves "
                                                    "(lr, grad_norm, tok_per_s, acc/+, ...), or "
                                                    "one of the ternary codes' (see below)."),
    by_layer: bool = flag("--by-layer", help="With a ternary metric: one curve per BitLinear "
                                             "layer."),
) -> None:
    """Draw the loss and metric curves of one or more runs.

    The curves: the train loss smoothed (and raw, in a file: in the terminal the raw points would
    bury the curve), the eval loss, and the experiment's eval metric (accuracy for arithmetic).

    Several runs share one figure, for example a BitNet run beside its --quant none twin:

      bitnet plot ternary full-precision --out curves.png

    At every evaluation a ternary run also logs its codes, for the whole model and per layer:
    zeros, minus and plus (the share of weights at 0, -1 and +1), flips (the share of codes
    changed since the evaluation before: they should settle as the run converges), scale (the
    weight scale mean|W|) and act_absmax (the mean per-token absmax of each layer's input):

      bitnet plot ternary --metric flips --by-layer --out flips.png
    """
    from bitnet_cli.report import plotting
    from bitnet_cli.store.selector import resolve_run

    if out is not None:
        plotting.check_out_path(out)
    collected = [plotting.collect(resolve_run(r), metric, by_layer) for r in runs]
    if out is not None:
        path = plotting.write_figure(collected, out)
        typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", err=True)
        return
    from bitnet_cli import ui
    from bitnet_cli.ui.charts import terminal_chart
    panels = list(dict.fromkeys(name for run in collected for name in run["panels"]))
    for panel in panels:
        series = [(f"{run['run_id']}: {label}" if len(collected) > 1 else label, pts)
                  for run in collected for label, pts in run["panels"].get(panel, {}).items()
                  if pts and label != "train loss"]
        ui.stdout.print(f"[bold]{panel}[/]")
        ui.stdout.print(terminal_chart(series, width=min(100, ui.stdout.width - 12),
                                          log_y=panel == "loss"))


@app.command(rich_help_panel="Watching")
@friendly
def compare(
    runs: List[str] = typer.Argument(..., help="Two or more runs of one experiment; the first "
                                               "is the yardstick. " + RUN_HELP, show_default=False,
                                     autocompletion=complete_run),
    out: Optional[Path] = typer.Option(None, help="Also write the curves to a .png, .svg or "
                                                  ".pdf: the held-out metric and loss against "
                                                  "steps and against tokens."),
    json: bool = flag("--json", help="Print JSON on stdout instead of tables."),
) -> None:
    """Compare runs side by side on their held-out metrics.

    Each run's final evaluation, with its ratio to the first run's, and the curves against steps
    and tokens.

    The comparison that matters for BitNet is a ternary run against its --quant none twin,
    trained on the same data with the same seed:

      bitnet train arithmetic --size tiny --name ternary
      bitnet train arithmetic --size tiny --quant none --name full-precision
      bitnet compare full-precision ternary --out compare.png
    """
    from bitnet_cli.report import plotting
    from bitnet_cli.report.comparison import compare_runs, figure_runs
    from bitnet_cli.store.selector import resolve_run

    if len(runs) < 2:
        raise BitnetError("compare needs two or more runs; to look at one, use "
                          f"`bitnet status {runs[0]}` or `bitnet plot {runs[0]}`")
    if out is not None:
        plotting.check_out_path(out)
    comparison = compare_runs([resolve_run(r) for r in runs])
    if out is not None:
        path = plotting.write_figure(figure_runs(comparison), out)
        typer.echo(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", err=True)
    if json:
        from bitnet_cli.store.files import to_json
        typer.echo(to_json(comparison))
        return
    from bitnet_cli import ui
    from bitnet_cli.ui import tables
    from bitnet_cli.ui.charts import terminal_chart
    ui.stdout.print(tables.comparison_table(comparison))
    headline = comparison["headline"]
    series = [(run["run_id"], [(p["step"], p[headline]) for p in run["curve"]
                               if p.get(headline) is not None]) for run in comparison["runs"]]
    ui.stdout.print(f"[bold]eval {headline} by step[/]")
    ui.stdout.print(terminal_chart(series, width=min(100, ui.stdout.width - 12),
                                      log_y=headline == "loss"))
