"""`bitnet status`, `eval` and `compare` as Rich tables."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from bitnet_cli.report.summary import (checkpoint_label, origin_line, shape_line, source_line,
                                       source_name, teacher_settings, weights_word)
from bitnet_cli.ui import count, format_duration, format_eval, format_rate, number


STATUS_STYLE = {"running": "bold green", "finished": "cyan", "interrupted": "yellow",
                "crashed": "bold red", "failed": "bold red", "created": "dim", "unknown": "dim",
                "damaged": "bold red", "imported": "cyan"}


def _eval_cell(s: dict) -> str:
    value = s.get("eval_value")
    if value is None:
        return "-"
    metric = s["eval_metric"]
    return f"{metric} {number(value, '.1%')}" if metric != "loss" else f"loss {number(value, '.4f')}"


# The runs table's columns, most wanted first: a narrow terminal drops them from the end.


RUN_COLUMNS = ("run", "state", "step", "eval", "train loss", "ETA", "time", "avg tok/s",
               "experiment", "params", "updated")


def runs_table(summaries: list[dict], width: int = 200):
    """Every run in a row, in as many columns as `width` holds; below the table, what was left
    out and why each damaged run is damaged."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    rows = [_run_cells(s) for s in summaries]
    measure = Console(width=10_000).measure

    def table_of(columns) -> Table:
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False,
                      padding=(0, 1, 0, 0))
        for column in columns:
            table.add_column(column, no_wrap=True, justify="left" if column in (
                "run", "state", "experiment", "updated") else "right")
        for r in rows:
            table.add_row(*(r[c] for c in columns))
        return table

    shown = list(RUN_COLUMNS)
    while len(shown) > 3 and measure(table_of(shown)).maximum > width:
        shown.pop()
    notes = [Text(f"{s['run_id']} is damaged: {s['error']}", style="red")
             for s in summaries if s["status"] == "damaged"]
    if len(shown) < len(RUN_COLUMNS):
        left_out = ", ".join(c for c in RUN_COLUMNS if c not in shown)
        notes.append(Text(f"(at {width} columns without: {left_out}; `bitnet status RUN` "
                          "shows one run in full)", style="dim"))
    return Group(table_of(shown), *notes) if notes else table_of(shown)


def _run_cells(s: dict) -> dict:
    world = f" ({s['world_size']} procs)" if (s.get("world_size") or 1) > 1 else ""
    speed = s.get("avg_tok_per_s") or s.get("tok_per_s")
    about = s.get("imported")
    return {
        "run": s["run_id"],
        "state": Text(s["status"], style=STATUS_STYLE.get(s["status"], "")),
        "step": "-" if about else f"{s['step']}/{s['total_steps'] or '?'}",
        "eval": _eval_cell(s),
        "train loss": number(s["loss"], ".4f"),
        "avg tok/s": (format_rate(speed) + world) if speed else "-",
        "ETA": format_duration(s["eta_s"]) if s.get("eta_s") is not None else "-",
        "experiment": (f"imported {source_name(about)} ({about.get('layout') or '?'}, "
                       f"{weights_word(about)})" if about else
                       f"{s['experiment'] or '-'} {s['size'] or ''}"
                       + (" fp" if s.get("quant") == "none" else "")),
        "time": format_duration(s["elapsed_s"]) if s.get("elapsed_s") is not None else "-",
        "params": count(s["params"]),
        "updated": (s.get("updated_at") or "-").replace("T", " ")[:16],
    }


def run_detail(d: dict):
    """One run in depth: what it is, where it is, recent metrics, checkpoints, a loss sparkline."""
    from rich.console import Group
    from rich.table import Table
    model, train = d["model"], d["train"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column(overflow="fold")  # a long path folds, whole
    head.add_row("run", Text.assemble(d["run_id"], "  ",
                                      (d["status"], STATUS_STYLE.get(d["status"], ""))))
    head.add_row("folder", d["path"])
    if d.get("imported"):  # a released model brought in by `bitnet import`: never trained here
        return _imported_detail(d, head)
    head.add_row("model", f"{d['experiment'] or '-'} {d['size'] or ''}, {count(d['params'])} parameters, "
                          f"{model.get('quant', '?')} {model.get('activation', 'relu2')}: "
                          f"{model.get('num_hidden_layers')} layers x "
                          f"{model.get('hidden_size')}, {model.get('num_attention_heads')}/"
                          f"{model.get('num_key_value_heads')} heads, FFN {model.get('intermediate_size')}, "
                          f"vocab {model.get('vocab_size')}")
    if origin_line(d):
        head.add_row("source", origin_line(d))
    if d.get("teacher"):
        head.add_row("teacher", f"{d['teacher']['path']}, {teacher_settings(d['teacher'])}")
    head.add_row("training", f"step {d['step']}/{d['total_steps'] or '?'}, batch "
                             f"{train.get('batch_size')} x seq {train.get('seq_len')} x accum "
                             f"{train.get('grad_accum')}, peak lr {train.get('lr')}, seed "
                             f"{train.get('seed')}")
    head.add_row("speed", _speed(d))
    head.add_row("time", (f"{format_duration(d['elapsed_s'])} training"
                          + (" so far" if d["status"] == "running" else " in all")
                          if d.get("elapsed_s") is not None else "-")
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
    for column in ("step", "train loss", "lr", "grad norm", "tok/s"):
        recent.add_column(column, justify="right")
    for r in d["recent_train"]:
        recent.add_row(str(r.get("step")), number(r.get("loss"), ".4f"), number(r.get("lr"), ".2e"),
                       number(r.get("grad_norm"), ".3f"),
                       format_rate(r["tok_per_s"]) if r.get("tok_per_s") else "-")
    evals = Table(title="recent evaluations", header_style="bold", title_justify="left")
    evals.add_column("step", justify="right")
    evals.add_column("result")
    for r in d["recent_eval"]:
        evals.add_row(str(r.get("step")), format_eval(r, d["eval_metric"]))
    return Group(head, recent, evals, *ternary_tables(d), _checkpoints(d))


def _imported_detail(d: dict, head):
    """An imported run: its model, where it came from, its checkpoint; no training to show."""
    from rich.console import Group
    model = d["model"]
    head.add_row("model", f"imported, {shape_line(model, d['params'])}; FFN "
                          f"{model.get('intermediate_size')}, {model.get('quant', '?')}")
    head.add_row("imported", source_line(d["imported"]))
    head.add_row("created", (d.get("created_at") or "-").replace("T", " ")[:19])
    if d.get("error"):
        head.add_row("error", Text(d["error"], style="red"))
    if d.get("argv"):
        head.add_row("command", " ".join(d["argv"]))
    return Group(head, _checkpoints(d))


def _checkpoints(d: dict):
    from rich.table import Table
    ckpts = Table(title="checkpoints", header_style="bold", title_justify="left")
    for column in ("name", "size", "saved", ""):
        ckpts.add_column(column)
    for c in d["checkpoints"]:
        ckpts.add_row(c["name"], f"{c['bytes'] / 2**20:.1f} MiB", (c.get("saved_at") or "-")[:19],
                      "latest" if c["latest"] else ("" if c["complete"] else "incomplete"))
    return ckpts


def _speed(d: dict) -> str:
    """The session's average (evaluations and checkpoints included) first, then the last
    logging interval's: one alone would mislead."""
    world = d.get("world_size") or 1
    over = f" over {world} processes" if world > 1 else ""
    recent = f"{format_rate(d['tok_per_s'])} tok/s" if d.get("tok_per_s") else None
    if not d.get("avg_tok_per_s"):
        return (recent + over) if recent else "-"
    average = f"{format_rate(d['avg_tok_per_s'])} tok/s on average{over}"
    return average + (f" ({recent} in the last logged steps)" if recent else "")


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
        recent.add_row(str(r.get("step")), *(number(r.get(key), fmt) for _, key, fmt in TERNARY_COLUMNS))
    for name, values in d.get("ternary_layers", {}).items():
        layers.add_row(name, *(number(values.get(key), fmt) for _, key, fmt in TERNARY_COLUMNS))
    return [recent, layers]


def eval_report(report: dict):
    """`bitnet eval`: which model, then its metrics; games as a won/drawn/lost table."""
    from rich.console import Group
    from rich.table import Table
    metrics = report["metrics"]
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    head.add_row("model", f"{report['model']}, {count(report['params'])} parameters")
    head.add_row("checkpoint", report["checkpoint"])
    note = report.get("engine_note")
    head.add_row("engine", report["engine"] + (f" ({note})" if note else ""))
    groups = [key[:-len("/won")] for key in metrics if key.endswith("/won")]
    counted = {f"{g}/{outcome}" for g in groups for outcome in ("won", "drawn", "lost")}
    for key in sorted(metrics, key=lambda key: key != report["headline"]):  # the headline first
        value = metrics[key]
        if key not in counted:
            shown = number(value, ".4f" if "loss" in key or key == "ppl" else ".1%")
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


def comparison_table(c: dict):
    """`bitnet compare`: one column per run, each final metric with its ratio to the first."""
    from rich.table import Table
    table = Table(title=f"{c['experiment']}, final eval (x: ratio to "
                        f"{c['runs'][0]['run_id']})", header_style="bold", title_justify="left")
    table.add_column("")
    for run in c["runs"]:
        table.add_column(f"{run['run_id']}\n{run['quant']} {run['size']}", justify="right")
    table.add_row("step", *(str(run["step"]) for run in c["runs"]))
    table.add_row("tokens", *(count(run.get("tokens")) for run in c["runs"]))
    if any(run.get("init_from") for run in c["runs"]):
        table.add_row("from", *(checkpoint_label(run["init_from"])
                                + (" (converted)" if run.get("converted") else "")
                                if run.get("init_from") else "-" for run in c["runs"]))
    if any(run.get("teacher") for run in c["runs"]):
        table.add_row("teacher", *(checkpoint_label(run["teacher"]["path"]) if run.get("teacher")
                                   else "-" for run in c["runs"]))
        table.add_row("distill", *(teacher_settings(run["teacher"]) if run.get("teacher")
                                   else "-" for run in c["runs"]))
    for metric in c["metrics"]:
        fmt = ".4f" if metric in ("loss", "ppl") or "loss" in metric else ".1%"
        cells = []
        for index, run in enumerate(c["runs"]):
            cell = number(run["final"][metric], fmt)
            if index and run["ratio"][metric] is not None:
                cell += f" ({run['ratio'][metric]:.3f}x)"
            cells.append(cell)
        table.add_row(metric, *cells)
    return table
