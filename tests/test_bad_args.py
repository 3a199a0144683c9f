"""Bad arguments, one table: each is one clear line (exit 1) or Typer's own usage error (exit 2),
never a traceback, and no run folder appears."""

import hashlib
import shutil

import pytest

from bitnet_cli.cli import app
from tests.cli import home_at, invoke, runner

RUN = "done"  # a finished 4-step run
BIG = "99999999999999999999999"

CASES = [
    # train
    (["train", "nosuch"], 1),
    (["train", "simple", "--size", "huge"], 1),
    (["train", "simple", "--steps", "0"], 1),
    (["train", "simple", "--steps", "-1"], 1),
    (["train", "simple", "--steps", "1000000000"], 1),
    (["train", "simple", "--steps", "abc"], 2),
    (["train", "simple", "--batch-size", "0"], 1),
    (["train", "simple", "--batch-size", BIG], 1),
    (["train", "simple", "--batch-size", "1000000"], 1),  # out of memory: refused at the start
    (["train", "simple", "--seq-len", "1"], 1),
    (["train", "simple", "--seq-len", "11"], 1),  # its longest problem needs 12
    (["train", "tictactoe", "--size", "tiny", "--seq-len", "9"], 1),  # a game needs 10
    (["train", "simple", "--grad-accum", "0"], 1),
    (["train", "simple", "--eval-every", "0"], 1),
    (["train", "simple", "--save-every", "-3"], 1),
    (["train", "simple", "--lr", "inf"], 1),
    (["train", "simple", "--lr", "nan"], 1),
    (["train", "simple", "--lr", "0"], 1),
    (["train", "simple", "--lr", "-0.1"], 1),
    (["train", "simple", "--seed", "-1"], 1),
    (["train", "simple", "--seed", BIG], 1),
    (["train", "simple", "--seed", str(2**32)], 1),
    (["train", "simple", "--name", "latest"], 1),
    (["train", "simple", "--name", ".hidden"], 1),
    (["train", "simple", "--name", "a/b"], 1),
    (["train", "simple", "--name", ".."], 1),
    (["train", "simple", "--name", ""], 1),
    (["train", "simple", "--name", "x" * 101], 1),
    (["train", "simple", "--name", RUN], 1),  # taken
    (["train", "simple", "--device", "tpu"], 1),
    (["train", "simple", "--quant", "binary"], 1),
    (["train", "simple", "--activation", "gelu"], 1),
    (["train", "simple", "--activation", "RELU2"], 1),
    (["train", "simple", "--nproc-per-node", "x"], 1),
    (["train", "simple", "--nproc-per-node", "0"], 1),
    (["train", "simple", "--vocab-size", "5"], 1),
    (["train", "simple", "--data", "nowhere.txt"], 1),
    (["train", "tinystories", "--size", "tiny", "--data", "nowhere.txt"], 1),
    (["train", "tinystories", "--size", "tiny", "--vocab-size", "10"], 1),
    # resume
    (["resume", "nosuch"], 1),
    (["resume", RUN], 1),  # finished, and no --steps
    (["resume", RUN, "--steps", "0"], 1),
    (["resume", RUN, "--steps", "4"], 1),  # not more than done
    (["resume", RUN, "--steps", "1000000000"], 1),
    (["resume", RUN, "--steps", "x"], 2),
    (["resume", RUN, "--nproc-per-node", "0"], 1),
    # status
    (["status", "nosuch"], 1),
    (["status", "--watch", "--json"], 1),
    (["status", "--interval", "0"], 2),
    (["status", "a/b/c"], 1),
    # plot
    (["plot", "nosuch"], 1),
    (["plot", RUN, "--out", "curves.txt"], 1),
    (["plot", RUN, "--out", "/nonexistent-folder/curves.png"], 1),
    (["plot", RUN, "--metric", "nosuch"], 1),
    (["plot"], 2),
    # export
    (["export", RUN, "--format", "zip", "--out", "{tmp}/x"], 1),
    (["export", "nosuch", "--format", "hf", "--out", "{tmp}/x"], 1),
    (["export", RUN, "--format", "hf", "--out", "{tmp}"], 1),  # not empty
    (["export", RUN, "--out", "{tmp}/x"], 2),
    # cost
    (["cost", "--params", "abc"], 1),
    (["cost", "--params", "-5"], 1),
    (["cost", "--params", "95M", "--gpus", "0"], 1),
    (["cost", "--params", "95M", "--mfu", "2"], 1),
    (["cost", "--params", "95M", "--mfu", "nan"], 1),
    (["cost", "--params", "95M", "--gpu", "nosuch"], 1),
    (["cost", "--from-run", "nosuch"], 1),
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    home = tmp_path_factory.mktemp("bad-args-home")
    with home_at(home):
        invoke("train", "simple", "--steps", "4", "--batch-size", "8", "--save-every", "4",
               "--eval-every", "4", "--no-compile", "--name", RUN)
    return home


def _listing(folder):
    """Every path under `folder` with its content's hash (None for a folder)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else None for p in folder.rglob("*")}


def _id(case):
    args = case.values[0] if hasattr(case, "values") else case[0]
    return " ".join(args)[:60]


@pytest.mark.parametrize("args, code", CASES, ids=[_id(c) for c in CASES])
def test_bad_argument(finished, bitnet_home, tmp_path, args, code):
    shutil.copytree(finished, bitnet_home)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    args = [a.replace("{tmp}", str(tmp_path / "full")) for a in args]
    before = _listing(bitnet_home)
    result = runner.invoke(app, args, input="")
    output = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{type(result.exception).__name__}: {result.exception}")
    assert result.exit_code == code, output
    assert "Traceback" not in output
    if code == 1:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and len(errors[0]) > 20, output
    assert _listing(bitnet_home) == before  # no run folder made, no file changed


def test_an_exception_is_told_in_one_line():
    from bitnet_cli.errors import first_line, typed_first_line
    assert first_line(OSError("\n  disk full  \nerrno 28")) == "disk full"
    assert first_line(RuntimeError("x" * 300), 10) == "x" * 10
    assert first_line(RuntimeError()) == "RuntimeError"  # it says nothing: its type
    assert typed_first_line(ValueError("bad value\nat line 3")) == "ValueError: bad value"
    assert typed_first_line(RuntimeError(" \n")) == "RuntimeError"
