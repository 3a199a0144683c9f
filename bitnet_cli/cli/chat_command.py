"""`bitnet chat`: talk to a trained model, its reply streamed token by token."""

from __future__ import annotations

import math
import sys
from typing import Optional

import typer

from bitnet_cli.config.sampling import check_sampling
from bitnet_cli.config.settings import DEVICE_HELP
from bitnet_cli.cli.app import (ENGINE_HELP, MODEL_HELP, app, complete_run, flag,
                                friendly, line_editing, load_text_model)
from bitnet_cli.errors import BitnetError

COMMANDS = """/help      this list
/reset     forget the conversation so far
/temp X    sampling temperature (0 = greedy)
/quit      leave (Ctrl-D does too; Ctrl-C stops a reply)"""


@app.command(rich_help_panel="Using a model")
@friendly
def chat(
    model: str = typer.Argument(..., help=MODEL_HELP, show_default=False,
                                autocompletion=complete_run),
    prompt: Optional[str] = typer.Option(None, help="Answer this once, print only the completion "
                                                    "on stdout, and exit."),
    temperature: Optional[float] = typer.Option(
        None, help="Sampling temperature; 0 is greedy. Default: 0 for the problem solvers "
                   "(simple, arithmetic: one answer is right); an imported model's own, from its "
                   "generation_config.json, where it has one; 0.8 for other text models.",
        show_default=False),
    top_k: Optional[int] = typer.Option(None, help="Sample among the K most likely tokens "
                                                   "(default: an imported model's own)."),
    top_p: Optional[float] = typer.Option(None, help="Sample among the smallest set of tokens whose "
                                                     "probability adds up to P (default: an "
                                                     "imported model's own)."),
    max_new_tokens: Optional[int] = typer.Option(
        None, help="Longest reply, in tokens (default 256); a reply also stops when the "
                   "context is full.", show_default=False),
    seed: Optional[int] = typer.Option(None, help="Seed the sampling, for repeatable replies."),
    engine: Optional[str] = typer.Option(None, help=ENGINE_HELP, show_default=False),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    head: Optional[str] = typer.Option(
        None, show_default=False,
        help="The 2bit and int8 engines' output layer: float16 (the default; an imported model "
             "that float16 cannot hold, a float32 one, keeps float32 so it computes its source's "
             "logits), float32, or int8 with one scale per row (half float16's bytes to read "
             "per token; its input rounded to 8 bits too, so its logits are within 5% of the "
             "float16 head's, not 3%)."),
    raw: bool = flag("--raw", help="Continue plain text, without the chat template an imported "
                                   "chat model brings (its turns are formatted by it otherwise)."),
    compile: bool = flag("--compile", help="Decode the float engine (or on a GPU) through a "
                                           "compiled one-token step: about 2.7x the tokens/s "
                                           "of a small model, 1.3x at 95M, after 4-17 s of "
                                           "compiling (a few seconds once inductor's cache has "
                                           "it). The 2bit and int8 engines on a CPU decode "
                                           "through a fused step, faster still, without it."),
) -> None:
    """Talk to a trained model, streaming its reply token by token.

    Text models continue the conversation: earlier turns, whole and newest first, are kept as
    long as a quarter of the context (or --max-new-tokens, if less) stays free for the reply.
    Problem solvers answer one problem at a time: for an arithmetic model, `12+35=` gives 47.
    After each reply, stderr gets its length, the time to its first token and the decoding
    speed, with the threads it used: as many as there are idle cores when the reply starts,
    so a chat beside a training run does not fight it for the same cores. Nothing of that goes
    to stdout, so `--prompt` output can be piped:

      bitnet chat latest --prompt "Once upon a time" --temperature 0 > story.txt

    In a terminal, the arrow keys edit the line and bring back earlier ones. Lines piped in get
    no `> ` prompt: stdout holds the replies alone.
    """
    check_sampling(temperature, top_k, top_p, max_new_tokens, seed)  # before a model loads
    from bitnet_cli.use.conversation import ChatSession

    loaded = load_text_model(model, device, engine, head)
    sampling = _sampling(loaded, temperature, top_k, top_p)
    if max_new_tokens is not None:
        sampling.max_new_tokens = max_new_tokens
    session = ChatSession(loaded, sampling, seed, compile,
                          notice=lambda line: typer.echo(f"note: {line}", err=True), raw=raw)
    if max_new_tokens is not None and max_new_tokens > session.context:
        typer.echo(f"note: --max-new-tokens {max_new_tokens:,} is more than this model's context "
                   f"of {session.context} tokens; replies stop when it is full", err=True)
    if prompt is not None:
        _stream(session, prompt)
        return
    from bitnet_cli.report.summary import model_label  # an imported model by name and source
    typer.echo(f"{model_label(loaded)}, context {session.context} tokens, "
               f"{loaded.engine} engine. /help lists the commands.", err=True)
    _converse(session)


def _sampling(loaded, temperature: float | None, top_k: int | None, top_p: float | None):
    """The flags given, each; for those not given, an imported model's stored defaults (its
    source's generation_config.json), said in one stderr line; else the experiment's."""
    from bitnet_cli.tasks import load_experiment
    from bitnet_cli.use.conversation import Sampling, default_temperature

    stored = getattr(loaded, "sampling", None) or {}
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    from_model = {key: value for key, value in stored.items() if given.get(key, 0) is None}
    values = {**given, **from_model}
    if values["temperature"] is None:
        values["temperature"] = default_temperature(load_experiment(loaded.experiment))
    if from_model and values["temperature"] > 0:  # greedy by --temperature 0: the rest is moot
        names = {"temperature": "temperature", "top_k": "top-k", "top_p": "top-p"}
        parts = [f"{names[key]} {values[key]:g}" for key in names if values[key] is not None]
        model_parts = [names[key] for key in names if key in from_model]
        whose = "the model's defaults" if len(model_parts) == len(parts) else \
            f"{' and '.join(model_parts)} from the model"
        typer.echo(f"sampling: {', '.join(parts)} ({whose}; --temperature 0 for greedy)", err=True)
    elif "temperature" in from_model:
        typer.echo("sampling: greedy (the model's default)", err=True)
    return Sampling(values["temperature"], values["top_k"], values["top_p"])


def _stream(session, prompt: str) -> None:
    """One reply, streamed to stdout as it is decoded, then its report on stderr."""
    for piece in session.reply(prompt):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _report(session)


def _converse(session) -> None:
    """Turns from the terminal until end of input, Ctrl-C at the prompt or /quit; Ctrl-C in a
    reply stops that reply only."""
    line_editing()
    while True:
        try:
            line = _next_turn()
        except (EOFError, KeyboardInterrupt):
            typer.echo("", err=True)
            return
        if not line.strip():
            continue
        if line.startswith("/"):
            if not _command(session, line.strip()):
                return
            continue
        replies = None
        try:
            replies = session.reply(line)
            for piece in replies:
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            if replies is not None:
                replies.close()
            sys.stdout.write(" [stopped]")
        except BitnetError as e:
            typer.echo(f"{e}", err=True)
            continue
        sys.stdout.write("\n")
        _report(session)


def _next_turn() -> str:
    """The next line typed, after a `> ` prompt that never goes to stdout: none for lines piped
    in, on stderr where stdout is not the terminal (the line editor draws it where it is)."""
    if not sys.stdin.isatty():
        return input()
    if sys.stdout.isatty():
        return input("> ")
    sys.stderr.write("> ")
    sys.stderr.flush()
    return input()


def _report(session) -> None:
    """One stderr line per reply: its length, the prompt's time to the first token, then the
    decoding speed, the threads it ran on (chosen from the cores free at the time) and the
    engine."""
    last = session.last
    parts = [f"{last.tokens} token{'s' if last.tokens != 1 else ''}"]
    if last.made == 0:  # stopped before the prompt's pass ended: no first token to time
        parts.append("stopped before the first token" if last.stopped == "interrupted" else
                     "no room for a reply")
        typer.echo(f"[{', '.join(parts)}]", err=True)
        return
    parts.append(f"first token in {1e3 * last.first_token_s:,.0f} ms")
    if last.made > 1:
        parts.append(f"{last.tokens_per_s:,.1f} tok/s")
    if last.threads:
        parts.append(f"{last.threads} thread{'s' if last.threads > 1 else ''}")
    parts.append(f"{session.loaded.engine} engine")
    ending = {"context": "context full", "length": "--max-new-tokens reached",
              "interrupted": "stopped"}.get(last.stopped)
    parts += [ending] if ending else []
    typer.echo(f"[{', '.join(parts)}]", err=True)


def _command(session, line: str) -> bool:
    """Carry out a /command; False means leave."""
    name, _, arg = line.partition(" ")
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        typer.echo(COMMANDS, err=True)
    elif name == "/reset":
        session.reset()
        typer.echo("(conversation forgotten)", err=True)
    elif name == "/temp":
        from bitnet_cli.config.sampling import TEMPERATURE_RULE, valid_temperature
        try:
            value = float(arg)
        except ValueError:
            value = math.nan
        if valid_temperature(value):
            session.sampling.temperature = value
            typer.echo(f"(temperature {value})", err=True)
        else:
            typer.echo(f"/temp takes {TEMPERATURE_RULE}, like /temp 0.7", err=True)
    else:
        typer.echo(f"unknown command {name}; /help lists them", err=True)
    return True
