"""Nothing lost under faults: a save cut at every write, fsync and rename; one writer per run;
a run killed before its first checkpoint; a diverging run; a full disk."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
from safetensors.torch import load_file

from bitnet_cli.cli import app
from bitnet_cli.store import checkpoint
from bitnet_cli.store.checkpoint import checkpoints_newest_first, newest_loadable, step_dir_name
from bitnet_cli.store.files import write_json_atomic
from bitnet_cli.training import session
from tests.cli import home_at, invoke, runner, state_step, wait_until

ARGS = ["simple", "--steps", "30", "--save-every", "10", "--eval-every", "10", "--no-compile"]


def weights(run, step=30):
    return (run / "checkpoints" / step_dir_name(step) / "model.safetensors").read_bytes()


def train_rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def leftovers(run):
    return sorted(p.name for p in run.rglob(".*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (checkpoints at 10, 20, 30), trained once for the whole module."""
    home = tmp_path_factory.mktemp("reference")
    with home_at(home):
        invoke("train", *ARGS, "--name", "ref")
    return home / "runs" / "ref"


def copy_at_step_10(reference, home, name):
    """The reference run as it was right after its step-10 checkpoint, as an interrupted run."""
    run = home / "runs" / name
    shutil.copytree(reference, run)
    for step in (20, 30):
        shutil.rmtree(run / "checkpoints" / step_dir_name(step))
    (run / "metrics.jsonl").write_text("".join(
        json.dumps(r) + "\n" for r in train_rows(reference) if r["step"] <= 10))
    state = json.loads((run / "state.json").read_text())
    write_json_atomic(run / "state.json", {**state, "status": "interrupted", "step": 10})
    return run


class Died(BaseException):
    """The process dies here. An exception that no handler of bitnet's catches, and from the
    moment it is raised every file operation raises it again: no cleanup reaches the disk, as
    after os._exit, and the run folder is left as a crash at that instant would leave it."""


# Every file operation a save performs, counted (in-process: a child process per case spent
# most of its time importing torch).
FILE_OPERATIONS = [(os, "fsync"), (os, "replace"), (os, "chmod"), (os, "unlink"),
                   (tempfile, "mkdtemp"), (tempfile, "mkstemp"), (shutil, "copyfile"),
                   (shutil, "rmtree"), (pathlib.Path, "write_text"), (checkpoint, "save_file")]


def resume_dying_at(crash_at: int, run) -> list[str]:
    """Resume the run and die just before the crash_at-th file operation of its step-20 save
    (crash_at=0: die nowhere). Returns the operations counted."""
    ops, active, dead = [], [False], [False]

    def counted(name, fn):
        def op(*args, **kwargs):
            if dead[0]:
                raise Died
            if active[0]:
                ops.append(name)
                if len(ops) == crash_at:
                    dead[0] = True
                    raise Died
            return fn(*args, **kwargs)
        return op

    real_save = session.save_checkpoint

    def save(checkpoints, step, *args, **kwargs):
        active[0] = step == 20
        try:
            return real_save(checkpoints, step, *args, **kwargs)
        finally:
            active[0] = False

    with pytest.MonkeyPatch.context() as patch:
        for owner, name in FILE_OPERATIONS:
            patch.setattr(owner, name, counted(name, getattr(owner, name)))
        patch.setattr(session, "save_checkpoint", save)
        try:
            runner.invoke(app, ["resume", run.name], catch_exceptions=False)
        except Died:
            pass
    assert dead[0] == (crash_at > 0)
    return ops


# The step-20 save: a temporary folder, two safetensors files, trainer.json and the tokenizer,
# an fsync of each and of the folder, its rename and the checkpoints folder's fsync, then
# `latest` the same way (made, fsynced, renamed, folder fsynced). Pruning has nothing to do yet.
SAVE_OPS = 18


def test_the_save_performs_SAVE_OPS(reference, bitnet_home):
    run = copy_at_step_10(reference, bitnet_home, "count")
    ops = resume_dying_at(0, run)
    assert len(ops) == SAVE_OPS, ops
    assert weights(run) == weights(reference)


@pytest.mark.parametrize("crash_at", range(1, SAVE_OPS + 1))
def test_crash_at_every_point_of_a_save(reference, bitnet_home, crash_at):
    run = copy_at_step_10(reference, bitnet_home, f"crash{crash_at}")
    resume_dying_at(crash_at, run)
    # What the crash left: the half-made checkpoint folder (made at op 1, renamed at op 12), or
    # `latest`'s temporary file (made at op 14, renamed at op 17).
    assert bool(leftovers(run)) == (2 <= crash_at <= 12 or 15 <= crash_at <= 17)
    path, contents, skipped = newest_loadable(run / "checkpoints")
    assert contents[2]["step"] in (10, 20) and not skipped
    invoke("resume", run.name)
    assert weights(run) == weights(reference)
    assert [(r["step"], r["split"]) for r in train_rows(run)] == \
        [(r["step"], r["split"]) for r in train_rows(reference)]
    assert leftovers(run) == []


def test_killed_before_first_checkpoint_resumes_from_step_zero(reference, bitnet_home):
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *ARGS, "--name", "early"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    state = bitnet_home / "runs/early/state.json"
    wait_until(lambda: state_step(state) >= 5, "step 5", proc)
    proc.kill()
    proc.wait()
    run = bitnet_home / "runs/early"
    assert checkpoints_newest_first(run / "checkpoints") == []
    assert json.loads(invoke("status", "early", "--json").stdout)["status"] == "crashed"
    invoke("resume", "early")
    assert weights(run) == weights(reference)
    assert [r["step"] for r in train_rows(run)] == [r["step"] for r in train_rows(reference)]


def wait_until_running(proc, run):
    def running():
        summary = json.loads(invoke("status", run.name, "--json").stdout)
        return summary["status"] == "running" and summary["step"] > 10
    wait_until(running, "the run to train past step 10", proc, every=0.05)


def test_one_writer_per_run(reference, bitnet_home):
    run = copy_at_step_10(reference, bitnet_home, "busy")
    config = (run / "config.json").read_bytes()
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "resume", "busy"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_until_running(proc, run)
    for args in (["resume", "busy"], ["resume", "busy", "--steps", "99"],
                 ["train", *ARGS, "--name", "busy"]):
        result = invoke(*args, code=1)
        assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
        assert "Traceback" not in result.output
    assert (run / "config.json").read_bytes() == config  # the refused --steps wrote nothing
    assert proc.wait(timeout=300) == 0, proc.stderr.read()
    assert weights(run) == weights(reference)
    steps = [(r["step"], r["split"]) for r in train_rows(run)]
    assert len(steps) == len(set(steps))


def test_diverging_run_fails_with_one_line_and_keeps_finite_checkpoints(bitnet_home):
    result = invoke("train", "simple", "--steps", "200", "--lr", "1e30", "--save-every", "5",
                    "--eval-every", "5", "--no-compile", "--name", "nan", code=1)
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: run nan diverged") and "--lr" in lines[-1]
    assert "Traceback" not in result.output
    run = bitnet_home / "runs/nan"
    status = json.loads(invoke("status", "nan", "--json").stdout)
    assert status["status"] == "failed" and status["step"] < 200
    for path in checkpoints_newest_first(run / "checkpoints"):
        assert all(t.isfinite().all() for t in load_file(path / "model.safetensors").values())
    json.loads(invoke("eval", "nan", "--json").stdout)
    invoke("plot", "nan")
    invoke("status", "nan")


def test_full_disk_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        monkeypatch.setenv("BITNET_HOME", str(disk / "home"))
        run = disk / "home/runs/full"
        # Two checkpoints of this model (1.2 MB each) fit; the third does not.
        for args in (["train", *ARGS, "--name", "full"], ["resume", "full"],
                     ["export", "full", "--format", "hf", "--out", disk / "exported"]):
            result = invoke(*args, code=1)
            errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in result.output
            assert errors[0].endswith("No space left on device; step_000000020 is kept") or \
                errors[0].endswith("No space left on device; nothing was written"), errors
            assert not [p for p in disk.rglob("*") if p.name.startswith(".")]
        assert not (disk / "exported").exists()
        path, contents, _ = newest_loadable(run / "checkpoints")
        assert contents[2]["step"] == 20
        assert json.loads((run / "state.json").read_text())["checkpoint_step"] == 20
        invoke("chat", "full", "--prompt", "abc=", "--temperature", "0")
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def kill_when(proc, run, moment, rng):
    """SIGKILL the training child at `moment`: before its first checkpoint, while a checkpoint
    is being written (its hidden temporary folder exists), or after a random delay."""
    target = rng.randint(2, 8)
    delay = time.monotonic() + rng.uniform(2.0, 12.0)

    def moment_came():
        if moment == "before first checkpoint":
            return state_step(run / "state.json") >= target
        if moment == "during a save":
            folder = run / "checkpoints"
            return folder.is_dir() and any(p.name.startswith(".step_") for p in folder.iterdir())
        return time.monotonic() >= delay

    # A save lasts milliseconds: look every millisecond. The run may also end first.
    wait_until(lambda: proc.poll() is not None or moment_came(), moment, proc, timeout=300,
               every=0.001)
    if proc.poll() is None:
        proc.kill()
    proc.wait()


TRIALS = int(os.environ.get("BITNET_KILL_TRIALS", "3"))  # 30 for the measurement in the notes


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(TRIALS))
def test_sigkill_at_random_instants_then_resume(reference, bitnet_home, trial):
    import random
    rng = random.Random(trial)
    moment = ("before first checkpoint", "during a save", "at random")[trial % 3]
    name = f"kill{trial}"
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *ARGS, "--name", name],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = bitnet_home / "runs" / name
    kill_when(proc, run, moment, rng)
    if moment != "at random":  # (a random instant may come after the end)
        assert proc.returncode == -9, moment
    if proc.returncode:  # killed (not finished first): carry on as a user would
        if (run / "config.json").is_file():
            invoke("resume", name)
        else:  # killed before the run folder appeared: nothing of it is left
            assert not run.exists()
            invoke("train", *ARGS, "--name", name)
    assert weights(run) == weights(reference), moment
    assert [(r["step"], r["split"]) for r in train_rows(run)] == \
        [(r["step"], r["split"]) for r in train_rows(reference)]
    assert leftovers(run) == []
