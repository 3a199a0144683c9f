"""One selector rule for every RUN and RUN|CKPT argument: a bare word is looked up in the runs
folder only, a path must be written as one, and nothing outside the runs folder is ever deleted.
A user keeps exports and projects beside their shell's working directory; bitnet never touches
them."""

import json
import os
import shutil

import pytest

from bitnet_cli.cli import app
from bitnet_cli.store.selector import written_as_path
from tests.cli import home_at, invoke, runner, snapshot

FAST = ["--eval-every", "4", "--save-every", "4", "--batch-size", "8", "--no-compile"]
RUNS = ("alpha", "beta", "ttt")
# Folders in the current directory named like every run, 'latest' and a prefix.
DECOYS = (*RUNS, "latest", "alp")


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A home with two simple runs and a tic-tac-toe run, trained once for the module."""
    home = tmp_path_factory.mktemp("selector-home")
    with home_at(home, cache=home.parent / "selector-cache"):
        invoke("train", "simple", "--steps", "8", *FAST, "--name", "alpha")
        invoke("train", "simple", "--steps", "4", *FAST, "--name", "beta")
        invoke("train", "tictactoe", "--size", "tiny", "--steps", "4", *FAST, "--name", "ttt")
    return home


@pytest.fixture
def runs(template, bitnet_home):
    shutil.copytree(template, bitnet_home)
    return bitnet_home / "runs"


@pytest.fixture
def here(tmp_path, monkeypatch):
    """The current directory for the test: a project folder of the user's."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def _make_decoys(here, runs, outputs):
    """Every kind of folder a user may keep here: a copy of a real run folder (another run's),
    an export of a run, and unrelated folders; each with a config.json, a model.safetensors
    and a sentinel file."""
    invoke("export", "beta", "--format", "hf", "--out", outputs / "export")
    for i, name in enumerate(DECOYS):
        decoy = here / name
        if i % 3 == 0:  # a real run folder, of another run than the one the word names
            shutil.copytree(runs / RUNS[(i + 1) % len(RUNS)], decoy, symlinks=True)
        elif i % 3 == 1:
            shutil.copytree(outputs / "export", decoy)
        else:
            decoy.mkdir()
            (decoy / "config.json").write_text("{}\n")
        if not (decoy / "model.safetensors").exists():
            (decoy / "model.safetensors").write_bytes(b"not a model")
        (decoy / "sentinel").write_text(f"{name} is mine\n")


# The whole command surface that takes a RUN or RUN|CKPT, each with bare words that are also
# folders here.
SURFACE = {
    "status": ["status"],
    "status RUN": ["status", "alpha"],
    "status latest --json": ["status", "latest", "--json"],
    "plot": ["plot", "alpha", "beta"],
    "plot --out": ["plot", "alp", "--out", "{out}/curves.png"],
    "compare": ["compare", "alpha", "beta", "--json"],
    "chat": ["chat", "alpha", "--prompt", "ab", "--temperature", "0"],
    "play": ["play", "ttt"],
    "play latest": ["play", "latest"],
    "eval": ["eval", "ttt", "--json"],
    "export": ["export", "alpha", "--format", "hf", "--out", "{out}/alpha-hf"],
    "cost --from-run": ["cost", "--from-run", "beta", "--gpu", "H100"],
    "resume": ["resume", "alpha", "--steps", "12"],
    "train": ["train", "simple", "--steps", "4", *FAST, "--name", "gamma"],
    "runs list": ["runs", "list"],
    "runs rm": ["runs", "rm", "beta", "--yes"],
}


@pytest.mark.parametrize("command", SURFACE)
def test_no_command_touches_a_folder_here_named_like_a_run(runs, here, tmp_path, command):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    _make_decoys(here, runs, outputs)
    before = snapshot(here)
    args = [a.replace("{out}", str(outputs)) for a in SURFACE[command]]

    result = runner.invoke(app, args, input="")

    assert result.exit_code == 0, result.output + result.stderr
    assert snapshot(here) == before, "a folder in the current directory changed"
    assert "Traceback" not in result.output + result.stderr
    if command == "status latest --json":
        assert json.loads(result.stdout)["path"] == str(runs / "ttt")
    if command == "runs rm":
        assert not (runs / "beta").exists() and (here / "beta" / "sentinel").is_file()
    if command == "resume":
        assert json.loads((runs / "alpha/state.json").read_text())["step"] == 12


@pytest.mark.parametrize("decoy", ["alpha", "beta", "ttt"])  # a run folder, an export, unrelated
def test_a_bare_word_is_the_run_even_when_a_folder_here_has_its_name(runs, here, tmp_path, decoy):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    _make_decoys(here, runs, outputs)
    detail = json.loads(invoke("status", decoy, "--json").stdout)
    assert detail["path"] == str(runs / decoy)


def test_rm_of_a_run_beside_its_export_removes_the_run_only(runs, here):
    invoke("export", "alpha", "--format", "hf", "--out", "alpha")
    before = snapshot(here)
    result = invoke("runs", "rm", "alpha", "--yes")
    assert f"removed {runs / 'alpha'}" in result.stderr
    assert not (runs / "alpha").exists() and snapshot(here) == before


@pytest.mark.parametrize("command", [
    ["runs", "rm", "proj", "--yes"], ["chat", "proj", "--prompt", "x"], ["status", "proj"],
    ["resume", "proj"], ["plot", "proj"], ["compare", "alpha", "proj"], ["eval", "proj"],
    ["play", "proj"], ["export", "proj", "--format", "hf", "--out", "x"],
    ["cost", "--from-run", "proj"],
])
def test_a_word_naming_no_run_but_a_folder_here_says_to_write_dot_slash(runs, here, command):
    (here / "proj").mkdir()
    (here / "proj/config.json").write_text("{}")
    result = invoke(*command, code=1)
    assert "no run 'proj'" in result.stderr and "write ./proj to mean the folder" in result.stderr
    assert result.stderr.count("\n") == 1
    assert (here / "proj/config.json").read_text() == "{}" and not (here / "x").exists()


@pytest.mark.parametrize("command", [["chat", "", "--prompt", "x"], ["status", " "],
                                     ["runs", "rm", "", "--yes"], ["resume", ""]])
def test_an_empty_run_is_one_line_not_every_run(runs, here, command):
    result = invoke(*command, code=1)
    assert "the run is empty" in result.stderr and result.stderr.count("\n") == 1
    assert sorted(p.name for p in runs.iterdir()) == sorted(RUNS)


def test_rm_refuses_a_run_folder_outside_the_runs_folder(runs, here):
    shutil.copytree(runs / "beta", here / "copy")
    before = snapshot(here)
    for selector in ("./copy", str(here / "copy"), "../work/copy"):
        result = invoke("runs", "rm", selector, "--yes", code=1)
        assert "is outside the runs folder" in result.stderr and "rm -r" in result.stderr
        assert result.stderr.count("\n") == 1
    assert snapshot(here) == before and (runs / "beta").is_dir()


def test_rm_refuses_a_link_in_the_runs_folder_to_a_folder_outside(runs, tmp_path):
    outside = tmp_path / "kept"
    os.replace(runs / "beta", outside)
    (runs / "beta").symlink_to(outside)
    before = snapshot(outside)
    for selector in ("beta", str(runs / "beta")):
        result = invoke("runs", "rm", selector, "--yes", code=1)
        assert "outside the runs folder" in result.stderr
    assert snapshot(outside) == before and os.path.islink(runs / "beta")


def test_rm_refuses_the_runs_folder_itself_dressed_as_a_run(runs):
    for name in ("config.json", "state.json"):
        shutil.copy(runs / "alpha" / name, runs / name)
    result = invoke("runs", "rm", str(runs), "--yes", code=1)
    assert "outside the runs folder" in result.stderr
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == sorted(RUNS)


def test_rm_takes_a_path_that_resolves_into_the_runs_folder(runs, here):
    (here / "link-to-runs").symlink_to(runs)
    invoke("runs", "rm", "./link-to-runs/beta", str(runs / ".." / "runs" / "alpha"), "--yes")
    assert sorted(p.name for p in runs.iterdir()) == ["ttt"]


def test_resume_refuses_a_run_folder_outside_the_runs_folder(runs, here):
    shutil.copytree(runs / "alpha", here / "copy")
    before = snapshot(here)
    result = invoke("resume", "./copy", "--steps", "12", code=1)
    assert "outside the runs folder" in result.stderr and "mv " in result.stderr
    assert snapshot(here) == before


def test_paths_written_as_paths_are_read_from_anywhere(runs, here):
    shutil.copytree(runs / "alpha", here / "copy")
    assert json.loads(invoke("status", "./copy", "--json").stdout)["path"] == str(here / "copy")
    checkpoint = next((here / "copy/checkpoints").glob("step_*"))
    for selector in ("./copy", f"copy/checkpoints/{checkpoint.name}", str(checkpoint)):
        invoke("chat", selector, "--prompt", "ab", "--temperature", "0")


def test_an_export_written_as_a_path_is_not_a_run(runs, here):
    invoke("export", "alpha", "--format", "hf", "--out", "exported")
    for command in (["chat", "./exported", "--prompt", "x"], ["status", "./exported"]):
        result = invoke(*command, code=1)
        assert "./exported is not a run folder" in result.stderr and "an export" in result.stderr


def test_a_run_named_like_a_data_folder_here_is_usable(runs, here):
    invoke("stories", "data/", "--stories", "20")
    invoke("train", "simple", "--steps", "4", *FAST, "--name", "data")
    stories = (here / "data/stories.jsonl").read_bytes()
    assert invoke("chat", "data", "--prompt", "ab", "--temperature", "0").stdout
    assert json.loads(invoke("status", "data", "--json").stdout)["path"] == str(runs / "data")
    invoke("runs", "rm", "data", "--yes")
    assert not (runs / "data").exists() and (here / "data/stories.jsonl").read_bytes() == stories


@pytest.mark.parametrize("selector, is_path", [
    ("alpha", False), ("latest", False), ("alp", False), ("data.v2", False),
    ("./alpha", True), ("../alpha", True), ("/x/alpha", True), ("~/alpha", True),
    ("runs/alpha", True), (".", True), ("..", True), ("~", True),
])
def test_the_rule_a_path_is_written_as_one(selector, is_path):
    assert written_as_path(selector) is is_path
