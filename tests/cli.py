"""Driving the CLI in-process, as a user would from a shell."""

import contextlib
import functools
import json
import os
import select
import subprocess
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


def wait_until(condition, what, proc=None, timeout=120, every=0.005, pause=None):
    """condition()'s first truthy value, checked again each time `pause(seconds)` returns, until
    `timeout`: the one way tests wait for a state, a file or an output. `pause` blocks until
    there may be news (at most the seconds given); by default it waits on `proc`, the process
    that makes the change, for `every` seconds, and the wait fails early if `proc` exits."""
    if pause is None:
        assert proc is not None, "wait_until needs the process that makes the change, or a pause"
        pause = functools.partial(wait_on, proc)
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        left = deadline - time.monotonic()
        assert left > 0, f"waited {timeout} s for {what}"
        pause(min(every, left))
    return value


def wait_on(proc, seconds):
    """Block until `proc` exits or `seconds` pass."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def wait_for_exit(pids, what, timeout=30):
    """Block until every process in `pids` has exited (children or not: each is watched through
    a pidfd), or fail at the deadline."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            assert left > 0, f"waited {timeout} s for {what}"
            for fd in select.select(fds, [], [], left)[0]:
                fds.remove(fd)
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def home_at(home, cache=None):
    """Runs (and token shards) under `home` for the block: a module fixture that trains once
    builds there, outside the per-test folders that conftest.py sets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITNET_HOME", str(home))
        mp.setenv("BITNET_CACHE", str(cache or home / "cache"))
        yield home
