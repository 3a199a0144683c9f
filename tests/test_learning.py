"""End-to-end learning: the README's commands, run as a user runs them. Minutes, not seconds."""

import json
import shutil
import subprocess

import pytest

from bitnet_cli.cli import app
from tests.test_int8 import assert_engines_agree
from tests.cli import runner


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
    result = runner.invoke(app, ["train", "arithmetic", "--size", "tiny"])
    assert result.exit_code == 0, result.stderr
    (run_dir,) = (bitnet_home / "runs").iterdir()
    last = final_eval(run_dir)
    assert last["acc/+"] >= 0.95 and last["acc/-"] >= 0.95, last
    assert_engines_agree(run_dir, "012+035=")  # the int8 engine, on a fully trained model

    # chat answers held-out sums the way a person writes them, at the measured accuracy.
    from bitnet_cli.use.conversation import ChatSession, Sampling
    from bitnet_cli.tasks.arithmetic import ArithmeticTask
    from bitnet_cli.use.loading import load_model
    session = ChatSession(load_model(str(run_dir)), Sampling(temperature=0.0, max_new_tokens=8))
    sums = [p for p in ArithmeticTask().heldout() if p[2] == "+"][:200]
    right = 0
    for prompt, _, _ in sums:
        a, b = int(prompt[:3]), int(prompt[4:7])
        right += "".join(session.reply(f"{a}+{b}=")) == str(a + b)
    assert abs(right / len(sums) - last["acc/+"]) <= 0.03, (right, last["acc/+"])
    result = runner.invoke(app, ["chat", str(run_dir), "--prompt", "12+35=", "--temperature", "0"])
    assert result.exit_code == 0 and result.stdout == "47\n"


@pytest.mark.slow
def test_tinystories_tiny_learns_a_local_corpus(bitnet_home, tmp_path):
    import re

    from bitnet_cli.data.stories import write_stories
    write_stories(tmp_path / "stories", 5000)
    result = runner.invoke(app, ["train", "tinystories", "--size", "tiny", "--data",
                                      str(tmp_path / "stories")])
    assert result.exit_code == 0, result.stderr
    (run_dir,) = (bitnet_home / "runs").iterdir()
    last = final_eval(run_dir)
    assert last["loss"] < 0.5 * last["unigram_loss"], last
    assert_engines_agree(run_dir, "Once upon a time")
    result = runner.invoke(app, ["chat", str(run_dir), "--prompt", "Once upon a time",
                                      "--temperature", "0", "--max-new-tokens", "60"])
    assert result.exit_code == 0
    corpus_words = set(re.findall(r"[a-z]+", (tmp_path / "stories/stories.jsonl").read_text().lower()))
    words = re.findall(r"[a-z]+", result.stdout.lower())
    assert len(words) >= 10 and sum(w in corpus_words for w in words) / len(words) >= 0.9, result.stdout
