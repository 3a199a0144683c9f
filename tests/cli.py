"""Driving the CLI in-process, as a user would from a shell."""

from typer.testing import CliRunner

from bitnet_cli.cli import app

runner = CliRunner()


def invoke(*args, code=0):
    """Run `bitnet ARGS...` and check its exit code; the result has .stdout and .stderr."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + result.stderr
    return result
