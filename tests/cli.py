"""Driving the CLI in-process, as a user would from a shell."""

import contextlib
import json
import time

import pytest
from typer.testing import CliRunner

from bitnet_cli.cli import app

runner = CliRunner()


def invoke(*args, code=0):
    """Run `bitnet ARGS...` and check its exit code; the result has .stdout and .stderr."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + result.stderr
    return result


def state_step(path):
    """The step a state.json says; 0 while it is absent or being replaced."""
    try:
        return json.loads(path.read_text()).get("step", 0)
    except (OSError, ValueError):
        return 0


def wait_until(condition, what, proc=None, timeout=120, every=0.005):
    """condition()'s first truthy value, checked every `every` seconds until `timeout`: the
    one way tests wait for a state, a file or an output. Fails early if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(every)
    return value


@contextlib.contextmanager
def home_at(home, cache=None):
    """Runs (and token shards) under `home` for the block: a module fixture that trains once
    builds there, outside the per-test folders that conftest.py sets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITNET_HOME", str(home))
        mp.setenv("BITNET_CACHE", str(cache or home / "cache"))
        yield home
