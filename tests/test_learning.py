"""End-to-end learning: the README's commands, run as a user runs them. Minutes, not seconds."""

import json
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from bitnet_cli.cli import app


def final_eval(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "eval"][-1]


def test_console_script_trains_simple(bitnet_home):
    """The installed `bitnet` entry point, in a subprocess, as on a fresh install."""
    exe = shutil.which("bitnet")
    if exe is None:
        pytest.skip("the bitnet console script is not on PATH")
    result = subprocess.run([exe, "train", "simple", "--steps", "40", "--eval-every", "20"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # progress goes to stderr, stdout stays clean
    assert "finished" in result.stderr
    (run_dir,) = (bitnet_home / "runs").iterdir()
    assert final_eval(run_dir)["step"] == 40


@pytest.mark.slow
def test_arithmetic_tiny_learns_addition_and_subtraction(bitnet_home):
    result = CliRunner().invoke(app, ["train", "arithmetic", "--size", "tiny"])
    assert result.exit_code == 0, result.stderr
    (run_dir,) = (bitnet_home / "runs").iterdir()
    last = final_eval(run_dir)
    assert last["acc/+"] >= 0.95 and last["acc/-"] >= 0.95, last
