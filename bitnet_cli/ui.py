"""Rich lives here and only here: the live training view and small tables. Output goes to stderr,
so stdout stays clean for `--json` and for piping."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

stderr = Console(stderr=True)

SMOOTHING = 0.9  # weight of the past in the displayed exponential moving average of the loss


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


def format_rate(tokens_per_s: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


def format_eval(row: dict, headline: str) -> str:
    parts = [f"loss {row['loss']:.4f}"]
    if headline in row:
        parts.append(f"{headline} {row[headline]:.1%}")
    groups = [f"{k.split('/', 1)[1]} {v:.0%}" for k, v in row.items() if k.startswith(f"{headline}/")]
    if groups:
        parts.append("(" + ", ".join(groups) + ")")
    return " ".join(parts)


class LiveTrainingView:
    """A progress bar with step/total, smoothed loss, lr, tokens/s, elapsed, ETA and last eval.
    Evaluations and checkpoints also print a permanent line above the bar."""

    def __init__(self, console: Console = stderr):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            TextColumn("{task.fields[stats]}"), console=console, transient=False)
        self.task = None
        self.smoothed = None
        self.headline = "loss"
        self.last_eval = ""
        self.last_train = ""
        self.rate_steps = None  # (start step, start time) for the ETA

    def start(self, info: dict) -> None:
        self.headline = info["headline"]
        where = f"resuming from {info['resumed_from']}" if info.get("resumed_from") else "from scratch"
        self.console.print(f"[bold]{info['run_id']}[/]: {info['params']} parameters on "
                           f"{info['device']}{' (compiled)' if info['compile'] else ''}, {where}")
        self.console.print(f"  run folder {info['run_dir']}")
        self.progress.start()
        self.task = self.progress.add_task("train", total=info["total_steps"], completed=info["step"],
                                           eta="--:--", stats="")
        self.rate_steps = (info["step"], time.perf_counter())

    def log(self, row: dict) -> None:
        loss = row["loss"]
        self.smoothed = loss if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * loss
        first_step, first_time = self.rate_steps
        total = self.progress.tasks[0].total
        steps_per_s = (row["step"] - first_step) / max(time.perf_counter() - first_time, 1e-9)
        eta = (total - row["step"]) / steps_per_s if steps_per_s > 0 else None
        self.last_train = f"loss {self.smoothed:.4f}  lr {row['lr']:.2e}  {format_rate(row['tok_per_s'])} tok/s"
        self.progress.update(self.task, completed=row["step"], eta=format_duration(eta),
                             stats=self.stats_line())

    def stats_line(self) -> str:
        return self.last_train + (f"  eval {self.last_eval}" if self.last_eval else "")

    def eval(self, row: dict) -> None:
        self.last_eval = format_eval(row, self.headline)
        self.progress.update(self.task, stats=self.stats_line())
        self.progress.console.print(Text(f"step {row['step']:>7}  eval  {self.last_eval}"))

    def checkpoint(self, step: int, path) -> None:
        self.progress.console.print(Text(f"step {step:>7}  saved {path.name}", style="dim"))

    def finish(self, info: dict) -> None:
        self.close()
        self.console.print(f"[bold green]{info['status']}[/] {info['run_id']} at step {info['step']}"
                           + (f": {format_eval(info['last_eval'], self.headline)}"
                              if info.get("last_eval") else ""))

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()
