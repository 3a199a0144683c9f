"""`bitnet cost`: what a training run costs, before you start it."""

from __future__ import annotations

from typing import Optional

import typer

from bitnet_cli.cli.app import RUN_HELP, app, flag, friendly
from bitnet_cli.config.numbers import format_count
from bitnet_cli.report.cost import DEFAULT_MFU, estimate, preset_names
from bitnet_cli.report.gpus import GPUS
from bitnet_cli.store.files import to_json


def _option(help: str, metavar: str | None = None):
    """An option that is unset unless given (its default comes from the preset, run or table)."""
    return typer.Option(None, help=help, metavar=metavar, show_default=False)


@app.command(help=f"""Estimate the FLOPs, GPU-hours, dollars and memory of a training run.

Say what to train with one of --params (a size), --preset (a built-in experiment, including
baseline: the original project's 95M run of 400k steps × 16 × 256 × 2 = 3.28B tokens; or 2b4t:
the released BitNet b1.58 2B4T, fine-tuned 1,000 steps of 16 × 4096 by default) or
--from-run (a run of yours, whose measured tokens/s also projects the rest of it; an imported
run, never trained here, is priced as a fine-tune of it: 1,000 steps of 16 × its context). The
horizon is --tokens, or --steps × --batch-size × --seq-len × --grad-accum, or else the preset's
or run's own steps; for --params alone it is the compute-optimal 20 tokens per parameter
(Chinchilla). A run's --seq-len is at most its context.

[bold]Compute[/]: FLOPs = 6·N·D + 12·L·d·T·D, for N parameters (embeddings included, a tied
head counted once), D tokens, L layers, width d and sequence length T: the weight matmuls
forward and backward plus the attention scores, as PaLM counts model FLOPs. A distillation
teacher (--teacher, or a --from-run run's own) adds its forward pass, 2·N·D + 4·L·d·T·D of its
shape, and its memory: fp32 weights, one layer's activations and three fp32 logit tensors.
GPU-hours = FLOPs / (peak × MFU); wall-clock = GPU-hours / --gpus (perfect data-parallel
scaling); dollars = GPU-hours × price.

[bold]Memory[/] per GPU for training: fp32 latent weights (4 B/param) + gradients (4) + AdamW
moments (8) + activations at the micro-batch, L·T·b·d·(34 + 5·h·T/d) + 4·T·b·(d + V) bytes
for h heads and vocabulary V (Korthikanti et al. 2022, no recomputation). A GPU fits it when
that is at most 90% of its memory. Inference: the weights with ternary BitLinear matrices packed at
2 bits, embeddings and norms in fp16, beside all fp16, as the BitNet b1.58 paper compares.

With --params alone the shape is estimated (width ≈ 128 × layers, 64-wide heads, vocabulary
32000, or 256 under 50M parameters); --layers, --hidden and --vocab pin it down. The attention
term and the activations depend on it; 6·N·D does not.

GPUs: {", ".join(g.name for g in GPUS)}.

Their peaks are dense bf16 (fp16 on T4 and V100) tensor figures from vendor datasheets, their
prices typical 2026 on-demand rates; --peak-tflops and --price override them.

Examples:

  bitnet cost --preset baseline --gpu A100-80GB     # the original 95M run on one A100

  bitnet cost --params 1.3B --tokens 26B --gpus 8   # every GPU in the table, 8 of each

  bitnet cost --params 95M --steps 400k --gpu RTX-3060 --price 0.08

  bitnet cost --from-run latest --gpu H100          # how long the rest of your run takes
""", rich_help_panel="Planning")
@friendly
def cost(
    params: Optional[str] = _option("Model size, like 500k, 95M, 1.3B or 7B.", "SIZE"),
    preset: Optional[str] = _option(f"A built-in experiment: {', '.join(preset_names())}.", "NAME"),
    from_run: Optional[str] = _option(RUN_HELP, "RUN"),
    teacher: Optional[str] = _option("Price distilling from this run or checkpoint folder "
                                     "(train --teacher); --from-run uses the run's own.",
                                     "RUN|CKPT"),
    tokens: Optional[str] = _option("Training tokens, like 2B.", "SIZE"),
    steps: Optional[str] = _option("Optimizer steps, like 400k (tokens = steps × batch × seq × "
                                   "grad-accum).", "SIZE"),
    batch_size: Optional[int] = _option("Sequences per micro-batch (default: the preset's or "
                                        "run's, else 16)."),
    seq_len: Optional[int] = _option("Tokens per sequence (default: the preset's or run's, "
                                     "else 256)."),
    grad_accum: Optional[int] = _option("Micro-batches per step (default: the preset's or run's, "
                                        "else 2)."),
    layers: Optional[int] = _option("Layers of a --params model (with --hidden)."),
    hidden: Optional[int] = _option("Width of a --params model (with --layers)."),
    vocab: Optional[int] = _option("Vocabulary of a --params model."),
    gpu: Optional[str] = _option("One GPU from the table (default: compare them all).", "NAME"),
    gpus: int = typer.Option(1, help="GPUs training together (data parallel)."),
    mfu: float = typer.Option(DEFAULT_MFU, help="Model FLOPs utilisation: the fraction of peak a "
                                                "run achieves; --from-run with --gpu measures "
                                                "yours."),
    price: Optional[float] = _option("Dollars per GPU-hour, instead of the table's (needs --gpu).",
                                     "USD_PER_GPU_HOUR"),
    peak_tflops: Optional[float] = _option("Peak dense bf16 TFLOP/s, instead of the table's (needs "
                                           "--gpu)."),
    json: bool = flag("--json", help="Print JSON on stdout instead of tables."),
) -> None:
    report = estimate(params=params, tokens=tokens, steps=steps, batch_size=batch_size,
                      seq_len=seq_len, grad_accum=grad_accum, preset_name=preset,
                      from_run=from_run, layers=layers, hidden=hidden, vocab=vocab, gpu=gpu,
                      gpus=gpus, mfu=mfu, price=price, peak_tflops=peak_tflops, teacher=teacher)
    if json:
        typer.echo(to_json(report))
    else:
        render(report)


def render(report: dict) -> None:
    from rich.console import Console

    console = Console(highlight=False)
    console.print(_summary(report))
    console.print(_gpu_table(report))
    if not all(g["bf16"] for g in report["gpus"]):
        console.print("* no bf16 tensor cores: the fp16 peak is shown, and `bitnet train` uses "
                      "bf16")
    if not any(g["fits"] for g in report["gpus"]):
        console.print("No GPU here holds a full training copy; sharding it (FSDP, ZeRO) is not "
                      "modelled.")
    if "run" in report:
        for line in _run_lines(report["run"], report["num_gpus"]):
            console.print(line)
    if "fine_tune_of" in report:
        console.print(_fine_tune_line(report["fine_tune_of"], report["horizon"]))


def _fine_tune_line(run: dict, h: dict) -> str:
    """What an imported run's price is of: it has no training of its own to finish."""
    from rich.markup import escape

    name = escape(run["run_id"])
    length = (f"{format_count(h['steps'])} steps" if h["steps"] is not None
              else f"{format_count(h['tokens'])} tokens")
    return (f"[bold]Run {name}[/] was imported, not trained here: this prices fine-tuning it "
            f"(`train --from {name}`) for {length} at {h['seq_len']:,} tokens a sequence "
            f"(its context: {run['context']:,}); --steps, --tokens and --seq-len change that.")


def _summary(report: dict):
    from rich.markup import escape
    from rich.table import Table

    m, h, f, mem = report["model"], report["horizon"], report["flops"], report["memory"]
    train, inference = mem["training"], mem["inference"]
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    estimated = m["source"] == "estimated"
    summary.add_row("Model", f"{format_count(m['params'])} parameters"
                    + ("" if estimated else f", {escape(m['source'])}"))
    summary.add_row("Shape", f"{_plural(m['layers'], 'layer')} × {m['hidden']}, "
                             f"{_plural(m['heads'], 'head')}, vocabulary {m['vocab']:,}"
                    + (" (estimated: set --layers, --hidden, --vocab)" if estimated else ""))
    if h["steps"] is not None:
        horizon = (f"{format_count(h['steps'])} steps × {h['batch_size']} × {h['seq_len']} × "
                   f"{h['grad_accum']} (batch × seq × grad-accum)")
    else:
        horizon = f"{h['basis']} (micro-batch {h['batch_size']} × {h['seq_len']})"
    summary.add_row("Tokens", f"{format_count(h['tokens'])} = {horizon}")
    teacher = report.get("teacher")
    if teacher:
        summary.add_row("Teacher", _teacher_line(teacher))
    summary.add_row("FLOPs", f"{_sci(f['total'])} = 6·N·D {_sci(f['dense_6nd'])} + attention "
                             f"12·L·d·T·D {_sci(f['attention'])}"
                    + (f" + teacher forward 2·N·D {_sci(f['teacher_2nd'])} + 4·L·d·T·D "
                       f"{_sci(f['teacher_attention'])}" if f["teacher_2nd"] else ""))
    summary.add_row("Training", f"{_bytes(train['total'])} per GPU = fp32 weights "
                                f"{_bytes(train['weights'])} + gradients "
                                f"{_bytes(train['gradients'])} + AdamW {_bytes(train['adamw'])} "
                                f"+ activations {_bytes(train['activations'])}"
                    + (f" + teacher {_bytes(train['teacher'])}" if "teacher" in train else ""))
    packed = inference["ternary_packed"]
    summary.add_row("Inference", f"weights fp16 {_bytes(inference['fp16'])}, ternary 2-bit packed "
                                 f"{_bytes(packed)} ({inference['fp16'] / packed:.2f}× smaller)")
    return summary


def _teacher_line(teacher: dict) -> str:
    """The teacher distilled from, or why it is left out."""
    from rich.markup import escape

    if "missing" in teacher:
        return f"[red]unreadable, costed without it[/]: {escape(teacher['missing'])}"
    return (f"{format_count(teacher['params'])} parameters, {_plural(teacher['layers'], 'layer')} "
            f"× {teacher['hidden']}, {escape(teacher['path'])} (its forward pass on every token)")


def _gpu_table(report: dict):
    from rich import box
    from rich.table import Table

    table = Table(title=f"On {_plural(report['num_gpus'], 'GPU')} at {report['mfu']:.0%} MFU",
                  box=box.SIMPLE, pad_edge=False, title_justify="left", title_style="bold")
    for column in ["GPU", "TFLOP/s", "GB", "$/h", "GPU-hours", "wall-clock", "cost", "fits"]:
        table.add_column(column, justify="left" if column == "GPU" else "right")
    for g in report["gpus"]:
        table.add_row(g["name"] + ("" if g["bf16"] else "*"), f"{g['peak_tflops']:g}",
                      f"{g['memory_gb']:g}", f"{g['price']:.2f}", _number(g["gpu_hours"]),
                      _duration(g["wall_clock_hours"]), _dollars(g["dollars"]),
                      "yes" if g["fits"] else "[red]no[/]")
    return table


def _run_lines(run: dict, gpus: int) -> list[str]:
    from rich.markup import escape

    lines = [f"[bold]Run {escape(run['run_id'])}[/] ({run['status'] or 'no state'}): step "
             f"{run['step']:,}, {format_count(run['tokens_done'])} of "
             f"{format_count(run['tokens_total'])} tokens done."]
    if not run["tokens_remaining"]:
        return lines + ["Nothing is left to train."]
    if not run["tok_per_s"]:
        return lines + ["No training speed measured yet: it has not logged a step."]
    line = (f"At its measured {format_count(run['tok_per_s'])} tokens/s the remaining "
            f"{format_count(run['tokens_remaining'])} tokens take "
            f"{_duration(run['remaining_hours'])}")
    if "gpu" in run:
        line += (f" and {_dollars(run['remaining_dollars'])} on {gpus} × {run['gpu']}, where that "
                 f"speed is {run['measured_mfu'] * 100:.3g}% MFU")
    elif run.get("device") and not run["device"].startswith("cuda"):
        line += (f" on its {run['device']}; that speed says nothing of a GPU's, so the GPU "
                 "figures above assume --mfu for the remaining tokens")
    return lines + [line + "."]


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _sci(x: float) -> str:
    return f"{x:.3g}".replace("e+", "e")


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _dollars(x: float) -> str:
    return f"${x:,.0f}" if x >= 100 else f"${x:.2f}"


def _duration(hours: float) -> str:
    for unit, scale, limit in (("s", 1 / 3600, 1 / 60), ("min", 1 / 60, 1), ("h", 1, 48),
                               ("days", 24, 2 * 365 * 24)):
        if hours < limit:
            return f"{hours / scale:.3g} {unit}"
    return f"{hours / (365 * 24):.3g} years"
