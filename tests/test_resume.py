"""Runs you can trust: a killed, interrupted or crashed run resumes onto the exact trajectory."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from bitnet_cli.store.checkpoint import newest_loadable, step_dir_name
from bitnet_cli.cli import app
from tests.cli import home_at, invoke, runner, snapshot, state_step, wait_until
from tests.test_status_plot import stand_in_trainer

# 80 steps prove what 200 did: checkpoints at 20, 40, 60, 80, and a kill past the first one.
STEPS = 80
ARGS = ["simple", "--steps", str(STEPS), "--save-every", "20", "--eval-every", "25", "--no-compile"]


def final_weights(home, name, step=STEPS):
    return (home / "runs" / name / "checkpoints" / step_dir_name(step) /
            "model.safetensors").read_bytes()


def metric_steps(home, name, split):
    path = home / "runs" / name / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if json.loads(line)["split"] == split]


def start_training(name):
    return subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *ARGS, "--name", name],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(home, name, at_least, proc, timeout=120):
    state = home / "runs" / name / "state.json"
    return wait_until(lambda: (step := state_step(state)) >= at_least and step,
                      f"step {at_least}", proc, timeout)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The final weights of an uninterrupted run, trained once for every test that needs them."""
    home = tmp_path_factory.mktemp("reference-home")
    with home_at(home):
        invoke("train", *ARGS, "--name", "reference")
    return final_weights(home, "reference")


def test_sigkill_then_resume_is_bit_identical(bitnet_home, reference):
    proc = start_training("killed")
    wait_for_step(bitnet_home, "killed", 25, proc)  # past the checkpoint at 20
    proc.kill()
    proc.wait()
    status = json.loads(invoke("status", "killed", "--json").stdout)
    assert status["status"] == "crashed"
    assert 25 <= status["step"] < STEPS
    invoke("resume", "killed")
    assert final_weights(bitnet_home, "killed") == reference
    expected = list(range(5, STEPS + 1, 5))
    assert metric_steps(bitnet_home, "killed", "train") == expected
    assert metric_steps(bitnet_home, "killed", "eval") == [25, 50, 75, 80]
    assert json.loads(invoke("status", "killed", "--json").stdout)["status"] == "finished"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_and_resumes_bit_identical(bitnet_home, reference, sig):
    proc = start_training("stopped")
    wait_for_step(bitnet_home, "stopped", 25, proc)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "continue with: bitnet resume stopped" in stderr
    assert "Traceback" not in stderr
    state = json.loads((bitnet_home / "runs/stopped/state.json").read_text())
    assert state["status"] == "interrupted"
    # The checkpoint is taken at the step where the signal landed, not the last cadence step.
    path, _, _ = newest_loadable(bitnet_home / "runs/stopped/checkpoints")
    assert path.name == step_dir_name(state["step"])
    invoke("resume", "stopped")
    assert final_weights(bitnet_home, "stopped") == reference
    assert metric_steps(bitnet_home, "stopped", "train") == list(range(5, STEPS + 1, 5))


def test_kill_during_checkpoint_write_keeps_previous(bitnet_home, reference, monkeypatch):
    import bitnet_cli.store.checkpoint as checkpoint
    real_save = checkpoint.save_file

    def dying_save(tensors, filename, **kw):
        if step_dir_name(40) in filename and "optim" in filename:
            raise KeyboardInterrupt  # the process dies half way through the write
        return real_save(tensors, filename, **kw)

    monkeypatch.setattr(checkpoint, "save_file", dying_save)
    invoke("train", *ARGS, "--name", "torn", code=130)
    ckpts = bitnet_home / "runs/torn/checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", step_dir_name(20)]
    assert (ckpts / "latest").read_text().strip() == step_dir_name(20)
    path, contents, _ = newest_loadable(ckpts)
    assert path.name == step_dir_name(20) and contents[2]["step"] == 20
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    invoke("resume", "torn")
    assert final_weights(bitnet_home, "torn") == reference


def test_disk_error_during_checkpoint_is_one_line(bitnet_home, monkeypatch):
    import bitnet_cli.store.checkpoint as checkpoint

    def full_disk(tensors, filename, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    result = invoke("train", "simple", "--steps", "4", "--save-every", "2", "--no-compile",
                    "--name", "full", code=1)
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot write checkpoint {step_dir_name(2)} in {bitnet_home / 'runs/full/checkpoints'}: "
        "No space left on device; there is no earlier checkpoint")
    state = json.loads((bitnet_home / "runs/full/state.json").read_text())
    assert state["status"] == "failed" and "No space left" in state["error"]


def test_ctrl_c_at_pytest_stops_pytest_once_the_run_is_saved(bitnet_home):
    """A Ctrl-C reaching an in-process training is passed on by the test runner, so pytest
    stops instead of counting one failed test and carrying on."""
    state = bitnet_home / "runs/hit/state.json"

    def press_ctrl_c():
        wait_until(lambda: state_step(state) >= 10, "step 10", pause=time.sleep, timeout=120)
        os.kill(os.getpid(), signal.SIGINT)

    pressing = threading.Thread(target=press_ctrl_c, daemon=True)
    pressing.start()
    with pytest.raises(KeyboardInterrupt):
        runner.invoke(app, ["train", *ARGS[:2], "1000000", *ARGS[3:], "--name", "hit"])
    pressing.join(timeout=10)
    saved = json.loads(state.read_text())
    assert saved["status"] == "interrupted" and saved["checkpoint_step"] == saved["step"]


def test_resume_extends_a_finished_run(bitnet_home):
    invoke("train", "simple", "--steps", "20", "--eval-every", "10", "--save-every", "10",
           "--no-compile", "--name", "short")
    first = json.loads((bitnet_home / "runs/short/state.json").read_text())
    assert first["elapsed_s"] > 0 and first["avg_tok_per_s"] > 0
    result = invoke("resume", "short", code=1)
    assert "already finished all 20 steps; pass --steps" in result.stderr
    invoke("resume", "short", "--steps", "30")
    status = json.loads(invoke("status", "short", "--json").stdout)
    assert status["status"] == "finished" and status["step"] == 30 and status["total_steps"] == 30
    assert status["elapsed_s"] > first["elapsed_s"]  # the run's time adds up over its sessions
    assert metric_steps(bitnet_home, "short", "train")[-4:] == [15, 20, 25, 30]
    result = invoke("resume", "short", "--steps", "25", code=1)
    assert "--steps 25 is not more than the 30 steps" in result.stderr


def test_a_hostile_run_time_in_state_json_starts_the_count_afresh(bitnet_home):
    invoke("train", "simple", "--steps", "10", "--eval-every", "10", "--save-every", "10",
           "--no-compile", "--name", "clock")
    path = bitnet_home / "runs/clock/state.json"
    for bad in (-5, 1e308, True):
        path.write_text(json.dumps({**json.loads(path.read_text()), "elapsed_s": bad}))
        invoke("resume", "clock", "--steps", str(json.loads(path.read_text())["step"] + 5))
        elapsed = json.loads(path.read_text())["elapsed_s"]
        assert 0 < elapsed < 3600, (bad, elapsed)


def test_damaged_newest_checkpoint_falls_back_to_the_one_before(bitnet_home):
    invoke("train", "simple", "--steps", "20", "--save-every", "5", "--eval-every", "20",
           "--no-compile", "--name", "damaged")
    ckpts = bitnet_home / "runs/damaged/checkpoints"
    model = ckpts / step_dir_name(20) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    # Pretend it stopped before the end, so there is something to resume.
    config_path = bitnet_home / "runs/damaged/config.json"
    result = invoke("resume", "damaged", "--steps", "25")
    assert "skipped" in result.stderr and step_dir_name(20) in result.stderr
    assert json.loads(config_path.read_text())["train"]["steps"] == 25
    assert newest_loadable(ckpts)[0].name == step_dir_name(25)


def test_bad_resumes_change_nothing(bitnet_home):
    invoke("train", "simple", "--steps", "10", "--save-every", "5", "--eval-every", "10",
           "--no-compile", "--name", "base")
    run = bitnet_home / "runs/base"
    state_path = run / "state.json"
    state = json.loads(state_path.read_text())

    # A running run: another live process holds it, as its trainer would.
    with stand_in_trainer(run) as pid:
        state_path.write_text(json.dumps({**state, "status": "running", "pid": pid}))
        before = snapshot(run)
        result = invoke("resume", "base", "--steps", "20", code=1)
    assert "is being trained by another process" in result.stderr
    assert result.stderr.count("\n") == 1
    assert snapshot(run) == before

    # Every checkpoint damaged.
    state_path.write_text(json.dumps({**state, "status": "crashed"}))
    for model in run.glob("checkpoints/step_*/model.safetensors"):
        model.write_bytes(b"not a safetensors file")
    before = snapshot(run)
    result = invoke("resume", "base", "--steps", "20", code=1)
    assert "no checkpoint in" in result.stderr and "can be read" in result.stderr
    assert result.stderr.count("\n") == 1 and snapshot(run) == before

    # (No checkpoint at all is no error: the run starts again from step 0; test_crash_safety.)

    # Unknown and ambiguous run ids name the closest ones.
    result = invoke("resume", "bsae", code=1)
    assert "no run 'bsae'" in result.stderr and "closest: base" in result.stderr
    invoke("train", "simple", "--steps", "2", "--no-compile", "--name", "base2")
    result = invoke("resume", "bas", code=1)
    assert "matches 2 runs" in result.stderr


@pytest.mark.parametrize("nonfinite", [5, "many", [1, 2], {"total": -1}, {"in_a_row": "x"}])
def test_a_damaged_skipped_step_count_is_one_line(bitnet_home, nonfinite):
    invoke("train", "simple", "--steps", "10", "--save-every", "10", "--eval-every", "10",
           "--no-compile", "--name", "counted")
    trainer = bitnet_home / "runs/counted/checkpoints" / step_dir_name(10) / "trainer.json"
    trainer.write_text(json.dumps({**json.loads(trainer.read_text()), "nonfinite": nonfinite}))
    result = invoke("resume", "counted", "--steps", "15", code=1)
    assert "nonfinite" in result.stderr and "Traceback" not in result.output + result.stderr
