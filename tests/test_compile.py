"""Compiled training keeps every guarantee eager training gives: the same seed gives the same
bytes, a killed run resumes onto the same trajectory, and without a C++ compiler (or when
compiling fails) it says so in one line and trains eagerly to the end."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bitnet_cli.nn import compiled
from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.config.settings import COMPILE_MIN_STEPS, TrainConfig
from tests.cli import invoke, state_step, wait_until

STEPS = 60
ARGS = ["simple", "--steps", str(STEPS), "--save-every", "20", "--eval-every", "30"]


def weights(home, name, step=STEPS):
    return (home / "runs" / name / "checkpoints" / step_dir_name(step) /
            "model.safetensors").read_bytes()


@pytest.mark.slow  # a compiled run killed and resumed: 14-26 s, kept out of the default suite's 5 minutes
def test_a_killed_compiled_run_resumes_onto_the_same_bytes(bitnet_home):
    """The same seed compiled twice, in two processes, gives the same bytes; and the second,
    killed with SIGKILL mid-run and resumed (compiled again), lands on them too."""
    out = invoke("train", *ARGS, "--compile", "--name", "reference").output
    assert "(compiled)" in out and "note:" not in out
    proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "train", *ARGS, "--compile",
                             "--name", "killed"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state = bitnet_home / "runs" / "killed" / "state.json"
    wait_until(lambda: state_step(state) >= 25, "step 25 (past the checkpoint at 20)", proc, 300)
    proc.kill()
    proc.wait()
    assert state_step(state) < STEPS
    out = invoke("resume", "killed").output
    assert "(compiled)" in out
    assert weights(bitnet_home, "killed") == weights(bitnet_home, "reference")


def test_no_compiler_is_one_line_then_eager_training(bitnet_home, monkeypatch):
    invoke("train", "simple", "--steps", "8", "--eval-every", "8", "--no-compile", "--name", "eager")
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    result = invoke("train", "simple", "--steps", "8", "--eval-every", "8", "--compile",
                    "--name", "hidden")
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1, result.output
    assert "no C++ compiler" in notes[0] and "CXX=/nonexistent/c++" in notes[0]
    assert "training eagerly" in notes[0]
    assert "(compiled)" not in result.output and "Traceback" not in result.output
    status = json.loads(invoke("status", "hidden", "--json").stdout)
    assert status["status"] == "finished" and status["step"] == 8
    # It really trained eagerly: the same bytes as a run that never tried to compile.
    assert weights(bitnet_home, "hidden", 8) == weights(bitnet_home, "eager", 8)


def test_a_compile_failure_on_the_first_step_falls_back_to_eager(monkeypatch):
    class Broken:
        def __call__(self, *args):
            raise RuntimeError("InductorError: the compiler crashed\nand more detail")
    monkeypatch.setattr(torch, "compile", lambda module: Broken())
    model = torch.nn.Linear(4, 2)
    notices = []
    forward = compiled.TrainingForward(model, True, notices.append)

    def micro_step(call, x):
        loss = call(x).sum()
        loss.backward()
        return loss.detach()
    x = torch.ones(3, 4)
    forward.run(micro_step, x)
    assert len(notices) == 1 and "the compiler crashed" in notices[0] and "\n" not in notices[0]
    assert not forward.compiled
    eager = torch.nn.Linear(4, 2)
    eager.load_state_dict(model.state_dict())
    eager(x).sum().backward()
    assert torch.equal(model.weight.grad, eager.weight.grad)  # counted once, not twice
    forward.run(micro_step, x)  # later steps go straight to the eager module
    assert len(notices) == 1


def test_a_failure_after_the_first_step_is_raised():
    forward = compiled.TrainingForward(torch.nn.Linear(4, 2), False, lambda text: None)

    def failing(call, x):
        raise ValueError("the model's own bug")
    with pytest.raises(ValueError):
        forward.run(failing, torch.ones(1, 4))


@pytest.mark.parametrize("device,steps,flag,expected", [
    ("cpu", COMPILE_MIN_STEPS - 1, None, False), ("cpu", COMPILE_MIN_STEPS, None, True),
    ("cuda", 10, None, True), ("mps", 10_000, None, False),
    ("cpu", 10, True, True), ("cuda", 10_000, False, False)])
def test_the_default_compile_rule(device, steps, flag, expected):
    cfg = TrainConfig(experiment="simple", size="tiny", steps=steps, batch_size=4, seq_len=16,
                      lr=1e-3, compile=flag)
    assert compiled.wants_compile(cfg, torch.device(device)) is expected


def test_inductor_cache_lives_in_the_bitnet_cache(bitnet_cache, monkeypatch):
    """One folder per ATen CPU capability: inductor's own cache key leaves it out."""
    monkeypatch.setattr(compiled, "_CACHE_SET_BY_USER", False)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled.use_bitnet_cache()
    capability = torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(bitnet_cache / "inductor" / capability)
    monkeypatch.setattr(compiled, "_CACHE_SET_BY_USER", True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    compiled.use_bitnet_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
