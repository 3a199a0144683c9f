"""What a person at a terminal sees: 80 columns, help text, completion, line editing, hints."""

import inspect
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from bitnet_cli.ui import format_eval, live, number
from bitnet_cli.cli import app, unwrap_help
from tests.cli import TmuxPane, home_at, invoke

FAST = ["--steps", "12", "--eval-every", "6", "--save-every", "6", "--no-compile"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Two finished runs with the default (long) run ids."""
    home = tmp_path_factory.mktemp("home")
    with home_at(home):
        invoke("train", "simple", *FAST)
        invoke("train", "arithmetic", "--size", "tiny", *FAST)
    return home


def bitnet(home, *args, columns=80, command=(sys.executable, "-m", "bitnet_cli"), **env):
    return subprocess.run([*command, *args], capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "BITNET_HOME": str(home), "COLUMNS": str(columns),
                               **env})


def test_status_at_80_columns_shows_whole_cells(home):
    done = bitnet(home, "status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert "…" not in done.stdout
    for column in ("run", "state", "step", "eval", "train loss"):
        assert column in lines[0]
    for run in (home / "runs").iterdir():
        assert run.name in done.stdout
    assert "finished" in done.stdout and "12/12" in done.stdout
    assert "without: " in done.stdout  # says what the narrow table leaves out
    wide = bitnet(home, "status", columns=200)
    assert "avg tok/s" in wide.stdout and "without" not in wide.stdout


def test_status_of_one_run_at_80_columns(home):
    done = bitnet(home, "status", "simple")
    assert done.returncode == 0, done.stderr
    assert all(len(line) <= 80 for line in done.stdout.splitlines())
    assert "…" not in done.stdout
    assert "tok/s on average" in done.stdout and "training in all" in done.stdout
    assert "train loss" in done.stdout


def test_status_json_has_the_run_time_and_average_speed(home):
    import json
    (row,) = [r for r in json.loads(bitnet(home, "status", "--json").stdout)
              if r["experiment"] == "simple"]
    assert row["elapsed_s"] > 0 and row["avg_tok_per_s"] > 0
    # The average counts evaluations and checkpoints, so it is below the best interval's speed.
    assert row["avg_tok_per_s"] < row["tok_per_s"] * 1.5


def live_view(width=80):
    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    view = live.LiveTrainingView(console)
    view.start({"run_id": "tictactoe-tiny-20261202-101010", "run_dir": "/x", "step": 0,
                "total_steps": 3000, "device": "cpu", "compile": False, "params": "718k",
                "headline": "not_lost", "experiment": "tictactoe", "size": "tiny"})
    return view


def drawn_lines(view, width=80) -> list[str]:
    """The live display as a terminal of `width` columns draws it."""
    screen = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None)
    for renderable in view.progress.get_renderables():
        screen.print(renderable)
    return screen.file.getvalue().splitlines()


def test_the_live_training_line_keeps_bar_step_and_eta_at_80_columns():
    view = live_view()
    for step in (10, 20):
        view.log({"step": step, "loss": 1.5, "lr": 2e-3, "tok_per_s": 43_700})
    view.eval({"step": 250, "loss": 0.41, "not_lost": 0.93,
               **{f"not_lost/{g}": 0.9 for g in ("random-x", "random-o", "perfect-x",
                                                 "perfect-o", "every-x", "every-o")}})
    bar, train, evaluation = drawn_lines(view)
    view.close()
    assert all(len(line) <= 80 for line in (bar, train, evaluation))
    assert bar.startswith("train ") and "20/3000" in bar and "ETA 0:00:" in bar
    assert len(bar) > 70  # the bar itself keeps its room
    assert train.startswith("train loss 1.5000 (smoothed)")
    assert evaluation.startswith("eval at step 250: loss 0.4100 not_lost 93.0%")
    assert evaluation.endswith("…")  # cut at the edge, not wrapped onto the bar's line


def test_a_long_cpu_run_hints_at_the_tiny_size_once(monkeypatch):
    clock = iter(range(0, 10_000, 10))
    monkeypatch.setattr(live.time, "perf_counter", lambda: next(clock))
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    view = live.LiveTrainingView(console)
    view.start({"run_id": "arithmetic-5M-1", "run_dir": "/x", "step": 0, "total_steps": 10000,
                "device": "cpu", "compile": True, "params": "3.2M", "headline": "acc",
                "experiment": "arithmetic", "size": "5M"})
    for step in (10, 20, 30):  # 10 steps per 10 s: 9970 steps to go is 2:46 h
        view.log({"step": step, "loss": 1.5, "lr": 2e-3, "tok_per_s": 4000})
    view.close()
    out = console.file.getvalue()
    assert out.count("--size tiny") == 1 and "bitnet resume arithmetic-5M-1" in out


@pytest.mark.parametrize("info, eta, hinted", [
    ({"device": "cpu", "experiment": "arithmetic", "size": "5M"}, 7200, True),
    ({"device": "cpu", "experiment": "arithmetic", "size": "5M"}, 600, False),
    ({"device": "cpu", "experiment": "arithmetic", "size": "tiny"}, 7200, False),
    ({"device": "cuda:0", "experiment": "baseline", "size": "95M"}, 7200, False),
])
def test_the_cpu_hint_is_for_long_cpu_runs_of_a_larger_size(info, eta, hinted):
    assert (live.cpu_size_hint({**info, "run_id": "r"}, eta) is not None) == hinted


def test_a_fine_tune_says_whose_weights_it_starts_from(bitnet_home):
    invoke("train", "simple", "--steps", "4", "--no-compile", "--name", "source")
    out = " ".join(invoke("train", "simple", "--steps", "2", "--no-compile", "--from", "source",
                          "--name", "tuned").stderr.split())
    assert "starting from the weights of " in out and "from scratch" not in out
    assert "runs/source/checkpoints/step_" in out.replace(" ", "")
    assert live.starting_point({"init_from": "/x", "resumed_from": "/y"}) == "resuming from /y"
    assert live.starting_point({"init_from": None}) == "from scratch"


def commands():
    return [*app.registered_commands,
            *(c for group in app.registered_groups for c in group.typer_instance.registered_commands)]


def test_help_paragraphs_are_one_line_each_so_rich_wraps_them_to_the_terminal():
    for command in commands():
        for paragraph in command.help.split("\n\n"):
            prose = [line for line in paragraph.splitlines() if line and not line[0].isspace()]
            assert len(prose) <= 1, (command.callback.__name__, paragraph)
        # Typer dedents what follows the first paragraph: the examples must keep their indent.
        rest = "\n\n".join(command.help.split("\n\n")[1:])
        assert inspect.cleandoc(rest) == rest.strip(), command.callback.__name__


def test_unwrap_keeps_indented_lines():
    text = "Title.\n\n    one two\n    three\n\n      bitnet x\n      bitnet y\n    four"
    assert unwrap_help(text) == "Title.\n\none two three\n\n  bitnet x\n  bitnet y\nfour"


def test_train_help_at_80_columns(home):
    out = bitnet(home, "train", "--help").stdout
    assert "3,000 steps of 64 x 64, lr 0.002" in out  # the tiny arithmetic preset's defaults
    assert "'bitnet-cli[tensorboard]'" in out  # not eaten as Rich markup
    assert "<bool>" not in out.replace("-h      ", "").split("--help")[0]  # flags take no value
    assert all(len(line) <= 80 for line in out.splitlines())


def test_shell_completion_offers_run_ids(home):
    run = next(p.name for p in (home / "runs").iterdir() if p.name.startswith("arithmetic"))
    # The `bitnet` script pipx or pip installed: the shell completes that name.
    script = [str(Path(sys.executable).parent / "bitnet")]
    done = bitnet(home, _BITNET_COMPLETE="complete_bash", COMP_WORDS="bitnet status ari",
                  COMP_CWORD="2", command=script)
    assert done.stdout.split() == [run], done.stderr
    source = bitnet(home, _BITNET_COMPLETE="source_bash", command=script).stdout
    assert "_bitnet_completion" in source


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_chat_has_line_editing_and_history_in_a_terminal(home, tmp_path):
    command = (f"BITNET_HOME={home} {sys.executable} -m bitnet_cli chat simple; echo EXIT=$?; "
               "sleep 60")
    with TmuxPane(command, tmp_path) as pane:
        pane.wait_for("/help lists the commands")
        def prompts(count):  # keys typed before input() asks would reach the bare terminal
            def asking(screen):
                lines = [line for line in screen.splitlines() if line.strip()]
                return lines[-1] == ">" and screen.count("first token in") == count - 1
            return pane.wait_until(asking, f"prompt number {count}")

        prompts(1)
        pane.send("d3", "Left", "Left", "x", "Right", "Right", "=", "Enter")  # edit in place
        prompts(2)
        pane.send("Up", "Enter")  # the line before, again
        screen = prompts(3)
        assert screen.count("> xd3=") == 2, screen
        assert "^[[" not in screen
        pane.send("C-d")
        assert "EXIT=0" in pane.wait_for("EXIT=")


def test_a_share_short_of_all_never_shows_as_all():
    """One lost line of thousands is not "100%": the tic-tac-toe headline says unbeaten only
    when nothing was lost."""
    row = {"loss": 0.41, "unbeaten": 0.9998, "unbeaten/x": 1.0, "unbeaten/o": 0.998}
    assert format_eval(row, "unbeaten") == "loss 0.4100 unbeaten 99.9% (x 100%, o 99%)"
    assert number(0.99999, ".0%") == "99%" and number(1.0, ".1%") == "100.0%"
    assert number(0.5, ".1%") == "50.0%" and number(1.5, ".0%") == "150%"
