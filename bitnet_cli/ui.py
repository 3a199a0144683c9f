"""Rich lives here and only here: the live training view and small tables. Output goes to stderr,
so stdout stays clean for `--json` and for piping."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

stderr = Console(stderr=True)
stdout = Console()

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
    """An eval row in one line; a value that is absent or not a number shows as '-'."""
    parts = [f"loss {_num(row.get('loss'), '.4f')}"]
    if headline != "loss" and headline in row:
        parts.append(f"{headline} {_num(row[headline], '.1%')}")
    if "unigram_loss" in row:
        parts.append(f"(unigram baseline {_num(row['unigram_loss'], '.4f')})")
    groups = [f"{k.split('/', 1)[1]} {_num(v, '.0%')}" for k, v in row.items()
              if k.startswith(f"{headline}/")]
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
        self.data_task = None
        self.smoothed = None
        self.headline = "loss"
        self.last_eval = ""
        self.last_train = ""
        self.rate_steps = None  # (start step, start time) for the ETA

    def preparing(self, what: str, done: int, total: int | None) -> None:
        if not self.console.is_terminal:
            return
        if self.data_task is None:
            self.progress.start()
            self.data_task = self.progress.add_task(what, total=total, eta="", stats="")
        self.progress.update(self.data_task, description=what, completed=done, total=total,
                             stats=f"{done:,} tokens" if done else "")

    def start(self, info: dict) -> None:
        if self.data_task is not None:
            self.progress.remove_task(self.data_task)
            self.progress.stop()
        self.headline = info["headline"]
        where = f"resuming from {info['resumed_from']}" if info.get("resumed_from") else "from scratch"
        world = info.get("world_size", 1)
        on = f"{world} processes on {info['device'].split(':')[0]}" if world > 1 else info["device"]
        self.console.print(f"[bold]{info['run_id']}[/]: {info['params']} parameters on "
                           f"{on}{' (compiled)' if info['compile'] else ''}, {where}")
        self.console.print(f"  run folder {info['run_dir']}")
        for reason in info.get("skipped_checkpoints") or []:
            self.console.print(Text(f"  skipped a damaged checkpoint: {reason}", style="yellow"))
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

    def notice(self, text: str) -> None:
        self.progress.console.print(Text(f"note: {text}", style="yellow"), soft_wrap=True)

    def finish(self, info: dict) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=info["step"])
        self.close()
        self.console.print(f"[bold green]{info['status']}[/] {info['run_id']} at step {info['step']}"
                           + (f": {format_eval(info['last_eval'], self.headline)}"
                              if info.get("last_eval") else ""))

    def close(self) -> None:
        if self.task is not None:
            self.progress.stop()


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


STATUS_STYLE = {"running": "bold green", "finished": "cyan", "interrupted": "yellow",
                "crashed": "bold red", "failed": "bold red", "created": "dim", "unknown": "dim",
                "damaged": "bold red"}


def _num(value, fmt: str) -> str:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return format(value, fmt) if ok else "-"


def _eval_cell(s: dict) -> str:
    value = s.get("eval_value")
    if value is None:
        return "-"
    metric = s["eval_metric"]
    return f"{metric} {_num(value, '.1%')}" if metric != "loss" else f"loss {_num(value, '.4f')}"


def _params(n) -> str:
    from bitnet_cli.config import format_count
    return format_count(n) if isinstance(n, (int, float)) else "-"


def runs_table(summaries: list[dict]):
    """Every run in a row; below the table, why each damaged one is damaged."""
    from rich.console import Group
    from rich.table import Table
    table = Table(title=None, expand=False, header_style="bold")
    for column, justify in [("run", "left"), ("experiment", "left"), ("params", "right"),
                            ("step", "right"), ("loss", "right"), ("eval", "right"),
                            ("tok/s", "right"), ("ETA", "right"), ("state", "left"),
                            ("updated", "left")]:
        table.add_column(column, justify=justify, no_wrap=column in ("run", "state"))
    for s in summaries:
        experiment = (f"{s['experiment'] or '-'} {s['size'] or ''}"
                      + (" fp" if s.get("quant") == "none" else ""))
        world = f" ({s['world_size']} procs)" if (s.get("world_size") or 1) > 1 else ""
        table.add_row(
            s["run_id"], experiment, _params(s["params"]),
            f"{s['step']}/{s['total_steps'] or '?'}", _num(s["loss"], ".4f"), _eval_cell(s),
            (format_rate(s["tok_per_s"]) + world) if s.get("tok_per_s") else "-",
            format_duration(s["eta_s"]) if s.get("eta_s") is not None else "-",
            Text(s["status"], style=STATUS_STYLE.get(s["status"], "")),
            (s.get("updated_at") or "-").replace("T", " ")[:19])
    damaged = [Text(f"{s['run_id']} is damaged: {s['error']}", style="red")
               for s in summaries if s["status"] == "damaged"]
    return Group(table, *damaged) if damaged else table


def run_detail(d: dict):
    """One run in depth: what it is, where it is, recent metrics, checkpoints, a loss sparkline."""
    from rich.console import Group
    from rich.table import Table
    model, train = d["model"], d["train"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("run", f"{d['run_id']}  [{STATUS_STYLE.get(d['status'], '')}]{d['status']}[/]")
    head.add_row("folder", d["path"])
    head.add_row("model", f"{d['experiment'] or '-'} {d['size'] or ''}, {_params(d['params'])} parameters, "
                          f"{model.get('quant', '?')} {model.get('activation', 'relu2')}: "
                          f"{model.get('num_hidden_layers')} layers x "
                          f"{model.get('hidden_size')}, {model.get('num_attention_heads')}/"
                          f"{model.get('num_key_value_heads')} heads, FFN {model.get('intermediate_size')}, "
                          f"vocab {model.get('vocab_size')}")
    head.add_row("training", f"step {d['step']}/{d['total_steps'] or '?'}, batch {train.get('batch_size')} x "
                             f"seq {train.get('seq_len')} x accum {train.get('grad_accum')}, "
                             f"peak lr {train.get('lr')}, seed {train.get('seed')}")
    world = d.get("world_size") or 1
    head.add_row("speed", (f"{format_rate(d['tok_per_s'])} tok/s" if d.get("tok_per_s") else "-")
                 + (f" over {world} processes" if world > 1 else "")
                 + (f", ETA {format_duration(d['eta_s'])}" if d.get("eta_s") is not None else ""))
    head.add_row("latest eval", _eval_cell(d) + (f" at step {d['eval_step']}" if d.get("eval_step") else ""))
    head.add_row("updated", f"{d.get('updated_at') or '-'} on {d.get('host') or '?'} (pid {d.get('pid') or '?'})")
    if d.get("error"):
        head.add_row("error", Text(d["error"], style="red"))
    if d["loss_sparkline"]:
        head.add_row("train loss", d["loss_sparkline"])
    if d.get("argv"):
        head.add_row("command", " ".join(d["argv"]))

    recent = Table(title="recent steps", header_style="bold", title_justify="left")
    for column in ("step", "loss", "lr", "grad norm", "tok/s"):
        recent.add_column(column, justify="right")
    for r in d["recent_train"]:
        recent.add_row(str(r.get("step")), _num(r.get("loss"), ".4f"), _num(r.get("lr"), ".2e"),
                       _num(r.get("grad_norm"), ".3f"),
                       format_rate(r["tok_per_s"]) if r.get("tok_per_s") else "-")
    evals = Table(title="recent evaluations", header_style="bold", title_justify="left")
    evals.add_column("step", justify="right")
    evals.add_column("result")
    for r in d["recent_eval"]:
        evals.add_row(str(r.get("step")), format_eval(r, d["eval_metric"]))
    parts = [head, recent, evals, *ternary_tables(d)]
    ckpts = Table(title="checkpoints", header_style="bold", title_justify="left")
    for column in ("name", "size", "saved", ""):
        ckpts.add_column(column)
    for c in d["checkpoints"]:
        ckpts.add_row(c["name"], f"{c['bytes'] / 2**20:.1f} MiB", (c.get("saved_at") or "-")[:19],
                      "latest" if c["latest"] else ("" if c["complete"] else "incomplete"))
    return Group(*parts, ckpts)


TERNARY_COLUMNS = (("-1", "minus", ".1%"), ("0", "zeros", ".1%"), ("+1", "plus", ".1%"),
                   ("flips", "flips", ".2%"), ("mean|W|", "scale", ".4f"),
                   ("input absmax", "act_absmax", ".2f"))


def ternary_tables(d: dict) -> list:
    """The codes at recent evaluations (the whole model), and layer by layer at the latest; a
    line saying why there are none for a full-precision run."""
    from rich.table import Table
    if d["model"].get("quant") == "none":
        return [Text("ternary codes: none, this is a --quant none (full-precision) run")]
    if not d.get("recent_ternary"):
        return []
    recent = Table(title="ternary codes (whole model; flips since the evaluation before)",
                   header_style="bold", title_justify="left")
    layers = Table(title=f"ternary codes by layer at step {d['recent_ternary'][-1]['step']}",
                   header_style="bold", title_justify="left")
    recent.add_column("step", justify="right")
    layers.add_column("layer")
    for table in (recent, layers):
        for title, _, _ in TERNARY_COLUMNS:
            table.add_column(title, justify="right")
    for r in d["recent_ternary"]:
        recent.add_row(str(r.get("step")), *(_num(r.get(key), fmt) for _, key, fmt in TERNARY_COLUMNS))
    for name, values in d.get("ternary_layers", {}).items():
        layers.add_row(name, *(_num(values.get(key), fmt) for _, key, fmt in TERNARY_COLUMNS))
    return [recent, layers]


CHART_MARKERS = "•ox+*#@%"


def terminal_chart(series: list[tuple[str, list[tuple[float, float]]]], width: int = 72,
                   height: int = 16, log_y: bool = False) -> Text:
    """A scatter-line chart in plain characters: one marker per series, axes labelled."""
    import math
    points = [(x, y) for _, pts in series for x, y in pts if not log_y or y > 0]
    if not points:
        return Text("(nothing to draw yet)")
    ty = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs = [x for x, _ in points]
    ys = [ty(y) for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    grid = [[" "] * width for _ in range(height)]
    colours = ["cyan", "magenta", "yellow", "green", "red", "blue", "white", "bright_black"]
    owner = [[None] * width for _ in range(height)]
    for index, (_, pts) in enumerate(series):
        for x, y in pts:
            if log_y and y <= 0:
                continue
            col = round((x - x0) / (x1 - x0) * (width - 1))
            row = height - 1 - round((ty(y) - y0) / (y1 - y0) * (height - 1))
            grid[row][col] = CHART_MARKERS[index % len(CHART_MARKERS)]
            owner[row][col] = index
    label = (lambda v: f"{10 ** v:.3g}") if log_y else (lambda v: f"{v:.3g}")
    text = Text()
    for r in range(height):
        value = y1 - (y1 - y0) * r / (height - 1)
        text.append(f"{label(value) if r in (0, height // 2, height - 1) else '':>8} │")
        for c in range(width):
            index = owner[r][c]
            text.append(grid[r][c], style=colours[index % len(colours)] if index is not None else "")
        text.append("\n")
    text.append(" " * 9 + "└" + "─" * width + "\n")
    text.append(f"{'step':>9} {x0:<{width // 2}.0f}{x1:>{width - width // 2}.0f}\n")
    for index, (name, _) in enumerate(series):
        text.append(f"  {CHART_MARKERS[index % len(CHART_MARKERS)]} {name}\n",
                    style=colours[index % len(colours)])
    return text


def board_text(board: str) -> Text:
    """A tic-tac-toe board ("X.O......", row by row): X and O in colour, each free cell shown
    by its number, which is what the person types to take it."""
    marks = {"X": "bold cyan", "O": "bold magenta"}
    text = Text()
    for row in range(3):
        for col in range(3):
            cell = row * 3 + col
            mark = board[cell]
            text.append(f" {mark} " if mark in marks else f" {cell + 1} ", style=marks.get(mark, "dim"))
            text.append("│" if col < 2 else "\n")
        if row < 2:
            text.append("───┼───┼───\n")
    return text


def eval_report(report: dict):
    """`bitnet eval`: which model, then its metrics; games as a won/drawn/lost table."""
    from rich.console import Group
    from rich.table import Table
    metrics = report["metrics"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", f"{report['experiment']}, {_params(report['params'])} parameters, "
                          f"step {report['step']}")
    head.add_row("checkpoint", report["checkpoint"])
    note = report.get("engine_note")
    head.add_row("engine", report["engine"] + (f" ({note})" if note else ""))
    groups = [key[:-len("/won")] for key in metrics if key.endswith("/won")]
    counted = {f"{g}/{outcome}" for g in groups for outcome in ("won", "drawn", "lost")}
    for key, value in metrics.items():
        if key not in counted:
            shown = f"{value:.4f}" if "loss" in key or key == "ppl" else f"{value:.1%}"
            head.add_row(key, Text(shown, style="bold" if key == report["headline"] else ""))
    if not groups:
        return head
    games = Table(header_style="bold", title="the model's games", title_justify="left")
    for column in ("opponent", "model as", "won", "drawn", "lost"):
        games.add_column(column, justify="left" if column in ("opponent", "model as") else "right")
    for group in groups:
        opponent, _, side = group.rpartition("-")
        lost = metrics[f"{group}/lost"]
        games.add_row("any (every line)" if opponent == "every" else opponent, side.upper(),
                      str(metrics[f"{group}/won"]), str(metrics[f"{group}/drawn"]),
                      Text(str(lost), style="bold red" if lost else "bold green"))
    return Group(head, games)


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.0f} ms"


def _percent(share: float | None) -> str:
    return f"{100 * share:.1f}%" if share is not None else "GPU not in cost's table"


def bench_report(r: dict):
    """`bitnet bench`: one table per measurement, the ratio column first."""
    from rich.console import Group
    from rich.table import Table

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", header_style="bold")
        for i, column in enumerate(columns):
            t.add_column(column, justify="left" if i == 0 else "right", style="bold" if i == 1 else "")
        return t

    m = r["machine"]
    on_gpu = "gpu" in m
    train = table("training step (forward + backward + AdamW), BitNet vs its --quant none twin, "
                  "eager and compiled" + (f" ({m['gpu']}, bf16 autocast)" if on_gpu else ""),
                  "shape", "compiled / eager", "BitNet / twin", "compiled BitNet / twin",
                  "BitNet", "twin", "compiled", "compiled twin", "first compiled step",
                  "batch x seq", *(("tok/s", "MFU", "twin tok/s", "twin MFU") if on_gpu else ()))
    for s in r["train_step"]:
        c = s.get("compiled")
        cells = ([f"{c['vs_eager']:.2f}x", f"{s['ratio']:.2f}x", f"{c['ratio']:.2f}x",
                  _ms(s["bitnet_s"]), _ms(s["twin_s"]), _ms(c["bitnet_s"]), _ms(c["twin_s"]),
                  f"{c['first_step_s']:.1f} s"] if c else
                 ["-", f"{s['ratio']:.2f}x", "-", _ms(s["bitnet_s"]), _ms(s["twin_s"]), "-", "-",
                  s["compile_problem"]])
        gpu_cells = ()
        if on_gpu and c:
            gpu_cells = (f"{c['tok_per_s']:,.0f}", _percent(c["mfu"]),
                         f"{c['twin_tok_per_s']:,.0f}", _percent(c["twin_mfu"]))
        train.add_row(s["shape"], *cells, s["batch"], *gpu_cells)
    if on_gpu:
        return train
    data = table("making one batch on the CPU, between training steps", "experiment and size",
                 "ms per batch", "batch x seq")
    for s in r["data"]:
        data.add_row(s["shape"], f"{s['ms']:.1f}", s["batch"])
    decode = table("decode with the KV cache, tokens/s: the int8 engine (float16 head) and the "
                   "float engine in fp32 and bf16 autocast", "shape", "int8 / fp32", "int8",
                   "fp32", "bf16 / fp32", "bf16")
    bandwidth = table(f"weights read per decoded token, and the bandwidth that makes (this machine: "
                      f"reads {m['read_gb_s']:.1f} GB/s, copies {m['copy_gb_s']:.1f} GB/s; "
                      f"{m['threads']} threads)", "shape", "int8 GB/s", "fp32 GB/s",
                      "int8 weights", "fp32 weights")
    layers = table("the BitLinear layers alone, one token through all of them", "shape",
                   "int8 / fp32", "int8", "fp32", "int8 GB/s", "fp32 GB/s")
    for d in r["decode"]:
        i8, f32, b16 = (d["engines"][k] for k in ("int8", "float32", "bf16 autocast"))
        decode.add_row(d["shape"], f"{d['int8_vs_float32']:.2f}x", f"{i8['tok_per_s']:.1f}",
                       f"{f32['tok_per_s']:.1f}", f"{d['bf16_vs_float32']:.2f}x",
                       f"{b16['tok_per_s']:.1f}")
        bandwidth.add_row(d["shape"], f"{i8['gb_s']:.1f}", f"{f32['gb_s']:.1f}",
                          _mib(i8["weight_bytes_per_token"]), _mib(f32["weight_bytes_per_token"]))
        lay = d["layers"]
        layers.add_row(f"{d['shape']} ({lay['count']} layers)", f"{lay['ratio']:.2f}x",
                       f"{lay['int8_ms']:.2f} ms", f"{lay['float_ms']:.2f} ms",
                       f"{lay['int8_gb_s']:.1f}", f"{lay['float_gb_s']:.1f}")
    size = table("projection weights on disk, fp32 latent vs 2-bit packed (hf-packed)",
                 "shape", "latent / packed", "latent", "packed", "whole file")
    for s in r["size"]:
        size.add_row(s["shape"], f"{s['ratio']:.1f}x", _mib(s["latent_bytes"]),
                     _mib(s["packed_bytes"]), f"{s['file_ratio']:.1f}x smaller")
    memory = table("memory of a fresh process on the baseline 95M shape (RSS)", "process",
                   "peak", "peak above idle", "at the end")
    idle = r["memory"][0]["peak_rss_bytes"]
    for s in r["memory"]:
        what = {"idle": "idle (imports only)", "decode": f"decode, {s['what']}",
                "train": "train, " + ("BitNet" if s["what"] == "ternary" else "twin")}[s["kind"]]
        memory.add_row(what, _mib(s["peak_rss_bytes"]), _mib(s["peak_rss_bytes"] - idle),
                       _mib(s["final_rss_bytes"]))
    kv = r["kv_cache"]
    cache = table(f"decode {kv['new_tokens']} tokens with the KV cache vs re-running the "
                  "sequence for each (int8 engine)", "shape", "cache / none", "cache", "none")
    cache.add_row(kv["shape"], f"{kv['ratio']:.1f}x", f"{kv['cache_tok_per_s']:.1f} tok/s",
                  f"{kv['no_cache_tok_per_s']:.1f} tok/s")
    return Group(train, data, decode, bandwidth, layers, size, memory, cache)


def comparison_table(c: dict):
    """`bitnet compare`: one column per run, each final metric with its ratio to the first."""
    from rich.table import Table
    table = Table(title=f"{c['experiment']}, final eval (x: ratio to "
                        f"{c['runs'][0]['run_id']})", header_style="bold", title_justify="left")
    table.add_column("")
    for run in c["runs"]:
        table.add_column(f"{run['run_id']}\n{run['quant']} {run['size']}", justify="right")
    table.add_row("step", *(str(run["step"]) for run in c["runs"]))
    table.add_row("tokens", *(_params(run.get("tokens")) for run in c["runs"]))
    for metric in c["metrics"]:
        fmt = ".4f" if metric in ("loss", "ppl") or "loss" in metric else ".1%"
        cells = []
        for index, run in enumerate(c["runs"]):
            cell = _num(run["final"][metric], fmt)
            if index and run["ratio"][metric] is not None:
                cell += f" ({run['ratio'][metric]:.3f}x)"
            cells.append(cell)
        table.add_row(metric, *cells)
    return table
