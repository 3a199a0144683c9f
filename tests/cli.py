"""Driving the CLI in-process, as a user would from a shell."""

import contextlib

import pytest
from typer.testing import CliRunner

from bitnet_cli.cli import app

runner = CliRunner()


def invoke(*args, code=0):
    """Run `bitnet ARGS...` and check its exit code; the result has .stdout and .stderr."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + result.stderr
    return result


@contextlib.contextmanager
def home_at(home, cache=None):
    """Runs (and token shards) under `home` for the block: a module fixture that trains once
    builds there, outside the per-test folders that conftest.py sets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITNET_HOME", str(home))
        mp.setenv("BITNET_CACHE", str(cache or home / "cache"))
        yield home
