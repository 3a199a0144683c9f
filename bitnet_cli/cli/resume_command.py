"""`bitnet resume`: a run continues exactly where it stopped, or trains further."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bitnet_cli.cli.app import RUN_HELP, app, complete_run, flag, friendly
from bitnet_cli.cli.train_commands import parse_nproc, train_with_view
from bitnet_cli.nn.cores import choose_wait_policy


@app.command(rich_help_panel="Training")
@friendly
def resume(
    run: str = typer.Argument(..., help=RUN_HELP, show_default=False,
                              autocompletion=complete_run),
    steps: Optional[int] = typer.Option(None, help="New total number of steps; more than "
                                                   "planned extends the run (see below)."),
    nproc_per_node: Optional[str] = typer.Option(
        None, help="Worker processes on this machine (default: as many as the run last used, "
                   "if it ran on one machine). Any number continues the same run: the batch "
                   "is global.", show_default=False),
    tensorboard: bool = flag("--tensorboard", help="From now on also write the metrics as "
                             "TensorBoard event files in RUN/tensorboard (a run trained with "
                             "--tensorboard goes on writing them)."),
) -> None:
    """Continue a run from its newest good checkpoint, exactly where it stopped.

    Model, optimizer, learning-rate schedule, step, data position and every random state come
    back, so on CPU the resumed run follows the uninterrupted trajectory bit for bit. Metrics
    logged after that checkpoint are dropped and trained again, so metrics.jsonl holds each
    step once. A damaged newest checkpoint is skipped for the one before it.

    --steps N past the planned total extends the run, finished or not: the planned steps keep
    their schedule, and from the planned end the learning rate re-warms linearly over the
    warmup steps (at most half the extension) from the rate the plan ended at to the stage-two
    starting rate, then anneals again to N; weight decay stays 0. A smaller N, still above the
    steps done, ends the current schedule at N instead.

    Only runs in the runs folder are resumed (it writes checkpoints and prunes old ones): move a
    run folder from elsewhere into it first.
    """
    choose_wait_policy()  # before torch is imported (nn/cores.py)
    from bitnet_cli.training import dist
    from bitnet_cli.store.runs import run_lock
    from bitnet_cli.store.selector import run_to_resume
    from bitnet_cli.training.setup import last_world_size, prepare_resume

    share = dist.current()
    nproc = parse_nproc(nproc_per_node, share)
    if share.distributed:  # under torchrun: rank 0 checks and extends the run, all train it
        def prepare() -> str:
            run_dir = run_to_resume(run)
            with run_lock(run_dir):
                prepare_resume(run_dir, steps, share, tensorboard)
            return str(run_dir)

        train_with_view(Path(dist.main_first(share, prepare)))
        return
    run_dir = run_to_resume(run)
    nproc = nproc or last_world_size(run_dir)
    # One writer per run: a second resume (or --steps change) of a run being trained is refused
    # before anything is written. With workers, rank 0 takes the lock over for the training.
    with run_lock(run_dir):
        prepare_resume(run_dir, steps, dist.on_this_machine(nproc), tensorboard)
        if nproc == 1:
            train_with_view(run_dir)
            return
    train_with_view(run_dir, nproc)
