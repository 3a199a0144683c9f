"""The Typer app every command module registers on, and what they share: the help strings,
`flag`, run-id completion, `friendly` (a BitnetError becomes one line and exit 1) and
`stoppable` (SIGTERM and SIGHUP stop a command as Ctrl-C does, cleanup included)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Optional

import typer

from bitnet_cli import __version__
from bitnet_cli.config.settings import MODEL_OPTIONS, flag_name, preset_default, train_options
from bitnet_cli.errors import BitnetError, Reported

app = typer.Typer(
    name="bitnet",
    help="Train BitNet b1.58 language models (ternary weights, 8-bit activations) from scratch, "
         "watch them train, talk to them, and ship them.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion: bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# The selector rule (selector.py): a bare word is looked up in the runs folder only, never in
# the current directory; a path must be written as one.
RUN_HELP = ("A run id, a unique prefix of one, or 'latest', looked up in the runs folder; or a "
            "path to a run folder, written with a slash (./NAME, ~/x/NAME).")
MODEL_HELP = ("A run id, a unique prefix of one, or 'latest' (the newest run with a checkpoint), "
              "looked up in the runs folder; or a path to a run or checkpoint folder, written "
              "with a slash (./NAME).")
ENGINE_HELP = ("2bit: ternary weights packed 2 bits each, multiplied by bitnet's own kernel (the "
               "default on CPU; compiled on first use, else int8 with a note). int8: ternary "
               "weights as int8 and torch's integer matmul. float: the training maths in "
               "floating point (the default on GPUs). 2bit and int8 give the same logits to the "
               "bit; the float engine's are within 3% of the largest logit, so the greedy token "
               "is the same wherever the top two are further apart than twice that (a near tie "
               "may go either way, on any engine or CPU).")


def flag(*names: str, help: str, default: bool | None = False, **options):
    """A switch: it takes no value, so the help shows no `<bool>` placeholder for one."""
    return typer.Option(default, *names, help=help, metavar="", **options)


def with_train_options(command):
    """`command(..., **settings)` gets one option per field that the config declares a flag
    (config.settings.option): its name, type, help and default all come from the field, so a
    setting is declared once. An option left out arrives as its field's default where no preset
    sets the field, else as None: the size's value stands."""
    given = [p for p in inspect.signature(command).parameters.values()
             if p.kind is not p.VAR_KEYWORD]
    # In --help: the command's arguments, then the settings, then its own other options.
    params = [p for p in given if isinstance(p.default, typer.models.ArgumentInfo)]
    for field, kind in train_options():
        help = field.metadata["help"].replace("[", "\\[")  # brackets are Rich markup in help
        if typing.get_args(kind):  # X | None: the option's type is X
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        name = flag_name(field)
        if kind is bool:  # a switch: both ways where its default is "decide for me", else on only
            names = (f"{name}/--no-{name[2:]}",) if field.default is None else (name,)
            default = flag(*names, default=None, show_default=False, help=help)
        elif field.name in MODEL_OPTIONS:  # left out: the model --from's, else the default
            default = typer.Option(None, name, help=help, show_default=str(field.default))
        else:
            default = typer.Option(preset_default(field), name, help=help,
                                   rich_help_panel=field.metadata["panel"])
        params.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY,
                                        annotation=Optional[kind], default=default))
    params += [p for p in given if p not in params]
    # Typer passes every parameter by name, so all of them may be keyword-only.
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params]
    command.__signature__ = inspect.signature(command).replace(parameters=params)
    return command


def complete_run(incomplete: str) -> list[str]:
    """Shell completion of a run argument: 'latest' and the run ids that start as typed."""
    from bitnet_cli.store.runs import list_run_dirs
    try:
        names = ["latest", *(run.name for run in reversed(list_run_dirs()))]
    except BitnetError:  # no usable runs folder: nothing to offer
        return []
    return [name for name in names if name.startswith(incomplete)]


def line_editing() -> None:
    """Arrow keys, line editing and the session's history for input() in a terminal, where
    Python has readline (not on Windows: there the console does it)."""
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401  (importing it is what turns it on)


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly(command):
    """Turn the core's BitnetError into one line on stderr and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Reported:
            raise typer.Exit(1) from None
        except BitnetError as e:
            fail(str(e))
        except OSError as e:  # the machine, not bitnet: a full disk, a permission, a lost mount
            where = f" ({e.filename})" if e.filename else ""
            fail(f"{e.strerror or e}{where}; nothing half-written was left behind")
        except KeyboardInterrupt as e:
            typer.echo(stopped_by(e), err=True)
            raise typer.Exit(130) from None

    return wrapper


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP), raised where the process was as Ctrl-C's
    KeyboardInterrupt is: every cleanup on the way out runs (a half-written folder goes)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def stopped_by(e: KeyboardInterrupt) -> str:
    return f"stopped by {e.signame}" if isinstance(e, Stopped) else "interrupted"


@contextlib.contextmanager
def stoppable(outcome: str):
    """SIGTERM and SIGHUP in the block raise Stopped, so the block's cleanup runs (their default
    ends the process on the spot, silently); that, or Ctrl-C, ends the command with one line, how
    it stopped and then `outcome`, and exit 130, as an interrupted training does. Each signal
    raises again (one swallowed by a C extension must not leave the process unstoppable), so a
    second may cut the cleanup short: what that leaves, the next command removes (see
    store.files). A signal the process ignores (nohup) stays ignored."""
    got = []

    def stop(signum, frame):
        got.append(signal.Signals(signum).name)
        raise Stopped(got[0])

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGHUP"):  # (Windows has no SIGHUP)
            sig = getattr(signal, name, None)
            if sig is not None and signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, stop)
    try:
        yield
    except BaseException as e:
        # After a signal, whatever comes out is the stop: raised inside a C extension's call
        # back into Python (torch's, safetensors'), Stopped may come out as that one's own error.
        if not got and not isinstance(e, KeyboardInterrupt):
            raise
        with contextlib.suppress(OSError):  # SIGHUP: the terminal may be gone
            typer.echo(f"{f'stopped by {got[0]}' if got else stopped_by(e)}; {outcome}",
                       err=True)
        raise typer.Exit(130) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"bitnet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    home: Optional[Path] = typer.Option(
        None, "--home", help="Folder that holds runs (default: the platform's user data folder; "
                             "the BITNET_HOME environment variable also sets it).",
        show_default=False),
    version: bool = flag("--version", callback=_version, is_eager=True,
                         help="Print the version and exit."),
) -> None:
    if home is not None:
        os.environ["BITNET_HOME"] = str(home)


def unwrap_help(text: str) -> str:
    """The help as Rich should wrap it: docstrings are wrapped in the source, and Typer keeps
    their line breaks, which re-wrap raggedly in a narrower terminal. Each paragraph becomes one
    line; indented lines (examples, lists) keep their own."""
    lines = inspect.cleandoc(text).splitlines()
    out: list[str] = []
    for line in lines:
        joins = out and out[-1] and line and not line[0].isspace() and not out[-1][0].isspace()
        if joins:
            out[-1] += " " + line
        else:
            out.append(line)
    return "\n".join(out)


def load_text_model(model: str, device: str, engine: str | None, head: str | None):
    """The model chat and serve talk to: loaded, its notes said on stderr, a tic-tac-toe model
    sent to `bitnet play`."""
    from bitnet_cli.nn.devices import resolve_device
    from bitnet_cli.use.loading import load_model

    loaded = load_model(model, resolve_device(device), engine, head)
    for note in loaded.notes:
        typer.echo(note, err=True)
    if loaded.experiment == "tictactoe":
        raise BitnetError(f"{loaded.checkpoint} is a tic-tac-toe model; play it with "
                          f"`bitnet play {model}`")
    return loaded
