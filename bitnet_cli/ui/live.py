"""The live training view: a progress bar with the run's numbers on lines below it, and the
transient line of data preparation."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from bitnet_cli.ui import format_duration, format_eval, format_rate, stderr

SMOOTHING = 0.9  # weight of the past in the displayed exponential moving average of the loss


class TrainingProgress(Progress):
    """Rich's progress bar, with the run's latest numbers on lines of their own below it: at 80
    columns the bar, step and ETA keep their place however long the eval summary grows."""

    def __init__(self, *columns, console: Console):
        self.lines: list[str] = []
        super().__init__(*columns, console=console, transient=False)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        for line in self.lines:  # cut to the width: a wrapped line would push the bar away
            text = Text(line)
            text.truncate(self.console.width, overflow="ellipsis")
            yield text


CPU_HINT_AFTER_S = 30 * 60  # a CPU run expected to take longer than this gets a --size tiny hint


class LiveTrainingView:
    """A progress bar with step/total, elapsed time and ETA; below it the smoothed train loss,
    lr and tokens/s, and the last evaluation. Evaluations and checkpoints also print a
    permanent line above the bar."""

    def __init__(self, console: Console = stderr):
        self.console = console
        self.progress = TrainingProgress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console)
        self.task = None
        self.data_task = None
        self.smoothed = None
        self.headline = "loss"
        self.info: dict = {}
        self.last_eval = ""
        self.last_train = ""
        self.rate_steps = None  # (step, time) the ETA's rate is measured from
        self.hinted = False

    def preparing(self, what: str, done: int, total: int | None) -> None:
        if not self.console.is_terminal:
            return
        if self.data_task is None:
            self.progress.start()
            self.data_task = self.progress.add_task(what, total=total, eta="")
        self.progress.update(self.data_task, description=what, completed=done, total=total)
        self.progress.lines = [f"{done:,} tokens"] if done else []

    def start(self, info: dict) -> None:
        if self.data_task is not None:
            self.progress.remove_task(self.data_task)
            self.progress.stop()
        self.info = info
        self.headline = info["headline"]
        where = starting_point(info)
        world = info.get("world_size", 1)
        on = f"{world} processes on {info['device'].split(':')[0]}" if world > 1 else info["device"]
        self.console.print(f"[bold]{info['run_id']}[/]: {info['params']} parameters on "
                           f"{on}{' (compiled)' if info['compile'] else ''}, {where}")
        self.console.print(f"  run folder {info['run_dir']}")
        for reason in info.get("skipped_checkpoints") or []:
            self.console.print(Text(f"  skipped a damaged checkpoint: {reason}", style="yellow"))
        self.progress.lines = []
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"],
                                           eta="-:--:--")

    def log(self, row: dict) -> None:
        loss = row["loss"]
        self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        self.last_train = (f"train loss {self.smoothed:.4f} (smoothed)  lr {row['lr']:.2e}  "
                           f"{format_rate(row['tok_per_s'])} tok/s")
        eta = None
        if self.rate_steps is None:  # from the first row on: compiling is not the pace
            self.rate_steps = (row["step"], time.perf_counter())
        else:
            first_step, first_time = self.rate_steps
            steps_per_s = (row["step"] - first_step) / max(time.perf_counter() - first_time, 1e-9)
            if steps_per_s > 0:
                eta = (self.progress.tasks[-1].total - row["step"]) / steps_per_s
        self.progress.update(self.task, completed=row["step"], eta=format_duration(eta))
        self.show_lines()
        if eta is not None and not self.hinted:
            self.hinted = True
            hint = cpu_size_hint(self.info, eta)
            if hint:
                self.notice(hint)

    def show_lines(self) -> None:
        self.progress.lines = [line for line in (self.last_train, self.last_eval) if line]
        self.progress.refresh()

    def eval(self, row: dict) -> None:
        summary = format_eval(row, self.headline)
        self.last_eval = f"eval at step {row['step']}: {summary}"
        self.show_lines()
        self.progress.console.print(Text(f"step {row['step']:>7}  eval  {summary}"))

    def checkpoint(self, step: int, path) -> None:
        self.progress.console.print(Text(f"step {step:>7}  saved {path.name}", style="dim"))

    def notice(self, text: str) -> None:
        # One line in a log or a pipe; wrapped at words in a terminal.
        self.progress.console.print(Text(f"note: {text}", style="yellow"),
                                    soft_wrap=not self.console.is_terminal)

    def finish(self, info: dict) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=info["step"])
        self.close()
        timing = ""
        if info.get("elapsed_s") is not None:
            timing = f" after {format_duration(info['elapsed_s'])} of training"
            if info.get("avg_tok_per_s"):
                timing += f" ({format_rate(info['avg_tok_per_s'])} tok/s on average)"
        self.console.print(f"[bold green]{info['status']}[/] {info['run_id']} at step {info['step']}"
                           f"{timing}" + (f"; eval {format_eval(info['last_eval'], self.headline)}"
                                          if info.get("last_eval") else ""))

    def close(self) -> None:
        if self.task is not None:
            self.progress.lines = []
            self.progress.stop()


def starting_point(info: dict) -> str:
    """Where the run's weights start: its checkpoint, the model it fine-tunes, or nothing; and
    the teacher it distils from, if any."""
    distilling = f", distilling from {info['teacher']}" if info.get("teacher") else ""
    if info.get("resumed_from"):
        return f"resuming from {info['resumed_from']}{distilling}"
    if info.get("init_from"):
        return f"starting from the weights of {info['init_from']}{distilling}"
    return f"from scratch{distilling}"


def cpu_size_hint(info: dict, eta_s: float) -> str | None:
    """For a long run on a CPU of a size larger than tiny: say how long, and what trains fast."""
    from bitnet_cli.config.presets import PRESETS
    preset = PRESETS.get(info.get("experiment"))
    if (not str(info.get("device", "")).startswith("cpu") or eta_s < CPU_HINT_AFTER_S
            or info.get("size") == "tiny" or preset is None or "tiny" not in preset.sizes):
        return None
    return (f"at this speed the run needs about {format_duration(eta_s)} more on this CPU; "
            f"`bitnet train {info['experiment']} --size tiny` is the size made for a CPU "
            f"(Ctrl-C stops here with a checkpoint; `bitnet resume {info['run_id']}` goes on)")


class DataProgress:
    """A transient progress line for data preparation (tokenizer training, encoding), shown
    only if there is work to do."""

    def __init__(self, console: Console = stderr):
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
                                 console=console, transient=True)
        self.task = None

    def __call__(self, what: str, done: int, total: int | None) -> None:
        if not self.progress.console.is_terminal:
            return  # a log or a pipe gets the outcome, not a redrawn bar
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task(what, total=total, stats="")
        self.progress.update(self.task, description=what, completed=done, total=total,
                             stats=f"{done:,} tokens" if done else "")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.task is not None:
            self.progress.stop()
        return False
