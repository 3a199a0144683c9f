"""`bitnet train`: start a run of one of the built-in experiments."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bitnet_cli.cli.app import app, friendly, with_train_options
from bitnet_cli.config.numbers import format_count
from bitnet_cli.store.metrics import check_tensorboard
from bitnet_cli.config.presets import PRESETS, check_experiment
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.cores import choose_wait_policy


def _size_line(experiment: str, size: str) -> str:
    """A size's defaults, as `--help` lists them: the shape and the schedule each flag overrides."""
    from bitnet_cli.report.cost import preset
    shape, train = preset(f"{experiment}-{size}")
    default = " (default)" if size == PRESETS[experiment].default_size else ""
    accum = f" x {train['grad_accum']}" if train["grad_accum"] > 1 else ""
    lr = PRESETS[experiment].sizes[size].train["lr"]
    return (f"  {size}{default}: {format_count(shape.params)}, {shape.layers} x {shape.hidden}; "
            f"{train['steps']:,} steps of {train['batch_size']} x {train['seq_len']}{accum}, "
            f"lr {lr:g}")


_EXPERIMENTS = "\n\n".join(
    f"[bold]{name}[/]: {p.about}\n" + "\n".join(_size_line(name, size) for size in p.sizes)
    for name, p in PRESETS.items())


def command_line(experiment: str, options: dict) -> list[str]:
    """The command as the user could retype it: the experiment and every option given."""
    from bitnet_cli.config.settings import flag_name, train_options
    flags = {field.name: flag_name(field) for field, _ in train_options()}
    argv = ["bitnet", "train", experiment]
    for key, value in options.items():
        flag = flags.get(key) or "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else f"--no-{key}")
        elif value is not None:
            argv += [flag, str(value)]
    return argv


@app.command(help=f"""Train a BitNet b1.58 model on one of the built-in experiments.

Every experiment is a preset (model shape, data, evaluator, schedule); each flag overrides it.
The run is written to a new folder under the runs folder (see --home), with config.json,
state.json, metrics.jsonl, tokenizer.json and safetensors checkpoints.

Each size's defaults: parameters, layers x width; steps of batch x sequence (x gradient
accumulation), peak learning rate.

{_EXPERIMENTS}

Examples:

  bitnet train simple                     # a one-minute check

  bitnet train arithmetic --size tiny     # + and - past 95% on a CPU

  bitnet train arithmetic --quant none    # the full-precision twin

  bitnet train arithmetic --activation silu   # as llama.cpp computes

  bitnet train tinystories --size tiny --data stories/   # your text

  bitnet train baseline --nproc-per-node 8   # data-parallel, 8 GPUs

Several machines: run torchrun on each, `torchrun --nnodes ... -m bitnet_cli train ...` (from a
pipx install, with the torchrun of bitnet's environment: see the README). --batch-size is always
the global batch: any number of processes trains the same model, each on its share of every batch.
""", rich_help_panel="Training")
@friendly
@with_train_options
def train(
    experiment: str = typer.Argument(..., help=f"One of: {', '.join(PRESETS)}.", show_default=False),
    nproc_per_node: Optional[str] = typer.Option(
        None, help="Data-parallel worker processes on this machine, one per GPU (or CPU "
                   "processes with gloo), started through torch.distributed.run.",
        show_default=False),
    **options,
) -> None:
    choose_wait_policy()  # before torch is imported (nn/cores.py)
    check_experiment(experiment)
    if options["tensorboard"]:
        check_tensorboard()
    from bitnet_cli.training import dist
    from bitnet_cli.training.setup import create_run, prepare_data
    from bitnet_cli.ui.live import DataProgress

    argv = command_line(experiment, {**options, "nproc_per_node": nproc_per_node})
    share = dist.current()
    nproc = parse_nproc(nproc_per_node, share)
    if share.distributed:  # every rank of a torchrun job runs this: rank 0 makes the run
        # Every rank finds or builds the data first, outside any collective's timeout.
        with DataProgress() as progress:
            prepare_data(experiment, progress=progress, share=share, **options)

        def make() -> str:
            return str(create_run(experiment, argv=argv, share=share, **options))

        train_with_view(Path(dist.main_first(share, make)))
        return
    with DataProgress() as progress:
        run_dir = create_run(experiment, argv=argv, progress=progress,
                             share=dist.on_this_machine(nproc or 1), **options)
    train_with_view(run_dir, nproc or 1)


@app.command(rich_help_panel="Training")
@friendly
def stories(
    folder: Path = typer.Argument(..., help="Folder to write stories.<format> into (made if "
                                            "absent; an existing file is never replaced).",
                                  show_default=False),
    count: int = typer.Option(5000, "--stories", help="How many stories."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same stories."),
    format: str = typer.Option("jsonl", help="jsonl, parquet or txt: each as the real data "
                                             "sets have them (a 'text' field)."),
) -> None:
    """Write made-up children's stories in the TinyStories style, to train on offline.

    The text experiments need no hub this way:

      bitnet stories stories/ --stories 5000
      bitnet train tinystories --size tiny --data stories/

    The stories are drawn from small word lists with the seed: varied, but predictable enough
    for a tiny model to learn in minutes, far below the unigram baseline.
    """
    from bitnet_cli.data.stories import write_stories
    existing = folder / f"stories.{format}"
    if existing.exists() or existing.is_symlink():
        raise BitnetError(f"{existing} exists already; choose another folder, or remove it first")
    path = write_stories(folder, count, seed, format)
    typer.echo(f"wrote {count:,} stories to {path}", err=True)


def parse_nproc(text: str | None, share) -> int | None:
    """--nproc-per-node as a count (None when not given). Under torchrun (`share`), which starts
    the workers itself, it is refused."""
    if text is None:
        return None
    if share.distributed:
        raise BitnetError("--nproc-per-node starts the workers itself; under torchrun, "
                          "leave it out and use torchrun's own --nproc-per-node")
    try:
        nproc = int(text)
    except ValueError:
        raise BitnetError(f"--nproc-per-node takes a whole number of processes, got {text!r}") from None
    if nproc < 1:
        raise BitnetError(f"--nproc-per-node must be at least 1, got {nproc}")
    return nproc


def train_with_view(run_dir, nproc: int = 1) -> None:
    """Run the training loop under the live view, in this process or as `nproc` workers; an
    interrupted run says how to continue."""
    from bitnet_cli.training import dist
    from bitnet_cli.training.loop import run_training
    from bitnet_cli.ui.live import LiveTrainingView

    if nproc > 1:
        # The workers resume the run just made (it starts at step 0); rank 0 shows the view.
        code, failure = dist.launch(nproc, ["resume", str(run_dir)])
        if failure:
            from bitnet_cli.training.setup import record_worker_failure
            typer.echo(f"error: {record_worker_failure(run_dir, failure)}", err=True)
        if code:
            raise typer.Exit(code)
        return
    main = dist.current().is_main
    view = LiveTrainingView() if main else None
    try:
        info = run_training(run_dir, view)
    finally:
        if view:
            view.close()
    if info["status"] == "interrupted" and main:
        saved = info.get("checkpoint_step")
        where = ("saved" if saved == info["step"] else
                 f"last checkpoint at step {saved}" if saved is not None else "no checkpoint yet")
        typer.echo(f"interrupted at step {info['step']} ({where}); continue with: "
                   f"bitnet resume {info['run_id']}", err=True)
    if info["status"] == "interrupted":
        raise typer.Exit(130)
