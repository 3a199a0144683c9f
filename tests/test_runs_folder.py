"""`bitnet runs list`, `bitnet runs rm` and `bitnet stories`: the runs folder and offline data."""

import json
import os

import pyarrow.parquet as pq
import pytest

from bitnet_cli.cli import app
from tests.cli import invoke, runner
from tests.test_status_plot import stand_in_trainer

FAST = ["--steps", "4", "--eval-every", "4", "--save-every", "4", "--no-compile"]


@pytest.fixture
def runs(bitnet_home):
    for name in ("alpha", "alphabet", "beta"):
        invoke("train", "simple", *FAST, "--name", name)
    return bitnet_home / "runs"


def test_list_prints_run_ids_oldest_first_and_hides_folders_being_made(runs):
    partial = runs / ".gamma.x1.partial"  # what atomic_folder fills before the rename
    partial.mkdir()
    (partial / "config.json").write_text((runs / "beta/config.json").read_text())
    assert invoke("runs", "list").stdout.split() == ["alpha", "alphabet", "beta"]
    assert invoke("runs", "list", "--paths").stdout.split() == [
        str(runs / name) for name in ("alpha", "alphabet", "beta")]
    assert "gamma" not in invoke("status").stdout


def test_rm_with_yes_removes_the_whole_run(runs):
    result = invoke("runs", "rm", "alpha", "beta", "--yes")
    assert f"removed {runs / 'alpha'}" in result.stderr
    assert sorted(os.listdir(runs)) == ["alphabet"]


def test_rm_asks_first_and_an_answer_other_than_yes_removes_nothing(runs):
    for answer in ("n\n", "\n", ""):  # no, the default (no), and the end of input
        result = runner.invoke(app, ["runs", "rm", "alpha"], input=answer)
        assert result.exit_code == 1 and "nothing removed" in result.stderr
        assert "alpha  " in result.stderr and "MiB" in result.stderr  # what it would remove
    assert (runs / "alpha").is_dir()
    assert runner.invoke(app, ["runs", "rm", "alpha"], input="y\n").exit_code == 0
    assert not (runs / "alpha").exists()


@pytest.mark.parametrize("selector, says", [
    ("alph", "'alph' is not one (it could mean alpha, alphabet)"),
    ("latest", "'latest' is not one (it could mean the newest run)"),
    ("gamma", "no run 'gamma'"),
])
def test_rm_takes_only_whole_run_ids(runs, selector, says):
    result = invoke("runs", "rm", selector, "--yes", code=1)
    assert says in result.stderr and result.stderr.count("\n") == 1
    assert sorted(os.listdir(runs)) == ["alpha", "alphabet", "beta"]


def test_rm_takes_a_run_folder_but_not_a_folder_inside_one(runs):
    result = invoke("runs", "rm", runs / "beta/checkpoints", "--yes", code=1)
    assert "is not a run folder" in result.stderr
    invoke("runs", "rm", runs / "beta", "--yes")
    assert not (runs / "beta").exists()


def test_rm_refuses_a_run_being_trained(runs):
    with stand_in_trainer(runs / "beta"):  # another process holds the run's lock, as a trainer does
        result = invoke("runs", "rm", "beta", "--yes", code=1)
        assert "is being trained by another process" in result.stderr
        assert (runs / "beta/config.json").is_file()
    invoke("runs", "rm", "beta", "--yes")


def test_rm_of_a_run_holding_a_link_leaves_what_it_points_at(runs, tmp_path):
    (runs / "alpha/planted").symlink_to(tmp_path / "also-kept")  # a link inside a run
    (tmp_path / "also-kept").write_text("mine")
    invoke("runs", "rm", "alpha", "--yes")
    assert not (runs / "alpha").exists() and (tmp_path / "also-kept").read_text() == "mine"


def test_a_damaged_run_can_be_removed(runs):
    (runs / "beta/config.json").write_text("{not json")
    invoke("runs", "rm", "beta", "--yes")
    assert not (runs / "beta").exists()


def test_stories_writes_each_format_and_never_replaces_a_file(tmp_path):
    invoke("stories", tmp_path / "s", "--stories", "7", "--seed", "3")
    rows = [json.loads(line) for line in (tmp_path / "s/stories.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(set(r) == {"text"} for r in rows)
    before = (tmp_path / "s/stories.jsonl").read_bytes()
    result = invoke("stories", tmp_path / "s", "--stories", "9", code=1)
    assert "exists already" in result.stderr
    assert (tmp_path / "s/stories.jsonl").read_bytes() == before
    invoke("stories", tmp_path / "s", "--format", "parquet", "--stories", "5")
    assert pq.read_table(tmp_path / "s/stories.parquet").column("text").length() == 5
    invoke("stories", tmp_path / "s", "--format", "txt", "--stories", "2")
    assert (tmp_path / "s/stories.txt").read_text().count("<|endoftext|>") == 1


@pytest.mark.parametrize("args, says", [
    (["--stories", "0"], "--stories must be at least 1"),
    (["--format", "csv"], "--format must be one of jsonl, parquet, txt"),
])
def test_stories_refuses_bad_input_in_one_line(tmp_path, args, says):
    result = invoke("stories", tmp_path / "s", *args, code=1)
    assert says in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_stories_into_a_file_is_one_line(tmp_path):
    (tmp_path / "f").write_text("x")
    result = invoke("stories", tmp_path / "f", code=1)
    assert "is a file, not a folder" in result.stderr


def test_runs_sort_by_the_instant_they_were_created_whatever_the_utc_offset(runs):
    created = {"alpha": "2026-01-01T10:00:00+00:00", "beta": "2026-01-01T11:30:00+02:00",
               "alphabet": "2026-01-01T09:45:00+00:00"}  # beta is 09:30 UTC: the oldest
    for name, when in created.items():
        path = runs / name / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "created_at": when}))
    assert invoke("runs", "list").stdout.split() == ["beta", "alphabet", "alpha"]
    assert json.loads(invoke("status", "latest", "--json").stdout)["run_id"] == "alpha"
    path = runs / "alpha" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "created_at": "not a time"}))
    assert invoke("runs", "list").stdout.split() == ["alpha", "beta", "alphabet"]


@pytest.mark.parametrize("command", [["train", "simple", "--steps", "4"], ["status"],
                                     ["runs", "list"]])
def test_a_home_that_links_nowhere_is_one_line(tmp_path, monkeypatch, command):
    home = tmp_path / "home"
    home.symlink_to(tmp_path / "unmounted-disk")
    monkeypatch.setenv("BITNET_HOME", str(home))
    result = invoke(*command, code=1)
    assert result.stderr == (f"error: BITNET_HOME {home} is a link to {tmp_path / 'unmounted-disk'}"
                             ", which does not exist; create that folder, or point BITNET_HOME "
                             "(or --home) elsewhere\n")
    assert not (tmp_path / "unmounted-disk").exists()
