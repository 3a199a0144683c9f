"""Bad arguments of chat, play and eval: one `error:` line and exit 1 (2 for Typer's own usage
errors), never a traceback."""

import re
from types import SimpleNamespace

import pytest
import torch

from bitnet_cli.cli import app
from bitnet_cli.use import loading
from bitnet_cli.tasks.tictactoe_rules import legal_moves, replay
from tests.cli import home_at, runner

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

MODEL = "{model}"  # the simple run of the fixture


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    with home_at(home):
        result = runner.invoke(app, ["train", "simple", "--steps", "20", "--save-every", "10",
                                     "--eval-every", "10", "--no-compile", "--name", "s"])
    assert result.exit_code == 0, result.output + result.stderr
    return str(home / "runs" / "s")


def run(model, *args, code, input=None):
    result = runner.invoke(app, [a.format(model=model) for a in args], input=input)
    assert result.exit_code == code, result.output + result.stderr
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    assert "Traceback" not in result.output + result.stderr
    return result


CHAT = ("chat", MODEL, "--prompt", "d3=")
BAD = [
    (CHAT + ("--temperature", "nan"), "--temperature must be 0 (greedy) or a number from 0.001"),
    (CHAT + ("--temperature", "inf"), "--temperature must be"),
    (CHAT + ("--temperature", "-1"), "--temperature must be"),
    (CHAT + ("--temperature", "1e-40"), "--temperature must be"),
    (CHAT + ("--top-p", "nan"), "--top-p must be above 0 and at most 1, got nan"),
    (CHAT + ("--top-p", "inf"), "--top-p must be"),
    (CHAT + ("--top-p", "0"), "--top-p must be"),
    (CHAT + ("--top-k", "0"), "--top-k must be a whole number from 1 up"),
    (CHAT + ("--top-k", "99999999999999999999"), "(the model's vocabulary), got 9999"),
    (CHAT + ("--max-new-tokens", "0"), "--max-new-tokens must be a positive whole number"),
    (CHAT + ("--max-new-tokens", "-5"), "--max-new-tokens must be"),
    (CHAT + ("--seed", "-1"), "--seed must be a whole number from 0 to 4,294,967,295, got -1"),
    (CHAT + ("--seed", "99999999999999999999999"), "--seed must be"),
    (CHAT + ("--engine", "bogus"), "--engine must be one of"),
    (CHAT + ("--head", "int4"), "--head must be one of float16, float32, int8, got 'int4'"),
    (CHAT + ("--head", "int8", "--engine", "float"), "--head int8 is the 2bit and int8 engines' option"),
    (CHAT + ("--device", "tpu"), "--device must be one of auto, cpu, cuda, mps, got 'tpu'"),
    (("play", MODEL, "--device", "tpu"), "--device must be one of"),
    (("eval", MODEL, "--device", "tpu"), "--device must be one of"),
    (("chat", "nope", "--prompt", "d3="), "no run 'nope'"),
    (("play", MODEL, "--as", "z"), "--as must be x or o, got 'z'"),
    (("play", MODEL, "--as", ""), "--as must be x or o, got ''"),
    (("play", MODEL, "--as", "xo"), "--as must be x or o"),
    (("play", MODEL), "is not a tic-tac-toe model (it was trained on simple)"),
    (("play", MODEL, "--engine", "bogus"), "--engine must be one of"),
    (("eval", "nope"), "no run 'nope'"),
    (("eval", MODEL, "--engine", "bogus"), "--engine must be one of"),
]


@pytest.mark.parametrize("args,message", BAD,
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_bad_argument_is_one_error_line(model, args, message):
    result = run(model, *args, code=1)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


BEFORE_LOADING = [(args, message) for args, message in BAD
                  if any(flag in args for flag in ("--temperature", "--top-p", "--max-new-tokens",
                                                   "--seed"))
                  or args[-2:] == ("--top-k", "0")] + [
    (("eval", MODEL, "--data", "/no/such/text"), "--data /no/such/text does not exist"),
]


@pytest.mark.parametrize("args,message", BEFORE_LOADING,
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_bad_flags_are_refused_before_a_model_loads(model, monkeypatch, args, message):
    """Loading a model takes seconds: a flag that is wrong whatever the model is said first."""
    from bitnet_cli.use import evaluation

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(loading, "load_model", no_loading)
    monkeypatch.setattr(evaluation, "load_model", no_loading)
    result = run(model, *args, code=1)
    assert result.stderr.startswith("error: ") and message in result.stderr


@pytest.mark.parametrize("args", [CHAT + ("--temperature", "warm"), CHAT + ("--top-k", "1.5"),
                                  CHAT + ("--seed", "9" * 5000), ("play", MODEL, "--as")])
def test_malformed_values_are_typer_usage_errors(model, args):
    run(model, *args, code=2)


def test_max_new_tokens_past_the_context_is_clamped_with_a_note(model):
    result = run(model, *CHAT, "--max-new-tokens", "999999999999", "--temperature", "0", code=0)
    assert "note: --max-new-tokens 999,999,999,999 is more than this model's context" in (
        result.stderr)
    # It replies (how many tokens a 20-step model says before its stop token is its own affair).
    assert re.match(r"\[\d+ tokens?, first token in ", result.stderr.splitlines()[-1])


def test_interactive_temp_nan_is_refused_and_chat_goes_on(model):
    result = run(model, "chat", MODEL, input="/temp nan\n/temp inf\n/temp 0\nd3=\n", code=0)
    assert result.stderr.count("/temp takes 0 (greedy) or a number from 0.001 up") == 2
    assert "(temperature 0.0)" in result.stderr and "first token in" in result.stderr


def test_a_huge_number_typed_into_play_is_asked_again(model, monkeypatch):
    class FirstFreeCell:
        def choose(self, lines):
            return [legal_moves(replay(moves))[0] for moves in lines], None

    loaded = SimpleNamespace(notes=[], checkpoint="ttt", step=1, engine="float")
    monkeypatch.setattr(loading, "load_player",
                        lambda selector, engine=None, device="auto": (FirstFreeCell(), loaded))
    result = run(model, "play", "ttt", input="9" * 5000 + "\n99999999999999999999\nq\n", code=0)
    assert "there is no cell 9999...: cells are numbered 1-9" in result.stdout
    assert result.stdout.count("Your move (X)") == 3


def test_a_problem_model_answers_greedily_unless_asked(model):
    """simple and arithmetic have one right answer: the same prompt gives the same reply."""
    greedy = run(model, "chat", MODEL, "--prompt", "d3=", "--temperature", "0", code=0).stdout
    for seed in ("1", "2", "3"):
        assert run(model, "chat", MODEL, "--prompt", "d3=", "--seed", seed, code=0).stdout == greedy
    sampled = {run(model, "chat", MODEL, "--prompt", "d3=", "--temperature", "5", "--seed", seed,
                   code=0).stdout for seed in ("1", "2", "3")}
    assert sampled != {greedy}  # asked for sampling, it samples


def test_model_commands_take_the_newest_run_with_a_checkpoint(model, bitnet_home):
    """`latest` and an ambiguous prefix: a run that has just started (no checkpoint yet) is
    passed over for the newest that has one; writers still ask for the whole id."""
    import json
    import shutil
    runs = bitnet_home / "runs"
    for name, created in (("adder-1", "2026-01-01"), ("adder-2", "2026-01-02"),
                          ("adder-3", "2026-01-03")):
        shutil.copytree(model, runs / name)
        config = json.loads((runs / name / "config.json").read_text())
        (runs / name / "config.json").write_text(json.dumps(
            {**config, "run_id": name, "created_at": f"{created}T00:00:00+00:00"}))
    shutil.rmtree(runs / "adder-3" / "checkpoints")  # just started
    for selector in ("latest", "adder"):
        result = run(model, "eval", selector, "--json", code=0)
        assert "/adder-2/checkpoints/" in json.loads(result.stdout)["checkpoint"]
        run(model, "chat", selector, "--prompt", "d3=", code=0)
    result = run(model, "resume", "adder", code=1)
    assert "matches 3 runs" in result.stderr and "give more of the run id" in result.stderr
    shutil.rmtree(runs / "adder-2" / "checkpoints")
    shutil.rmtree(runs / "adder-1" / "checkpoints")
    result = run(model, "chat", "adder", "--prompt", "d3=", code=1)
    assert "none of the 3 runs 'adder' names has a checkpoint yet" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("args", [CHAT, ("play", MODEL), ("eval", MODEL)], ids=lambda v: v[0])
def test_device_cuda_without_a_gpu_is_one_line(model, args):
    result = run(model, *args, "--device", "cuda", code=1)
    assert result.stderr.startswith("error: --device cuda is not available here (")
    assert result.stderr.count("\n") == 1


def test_a_reply_reports_its_first_token_time_and_speed(model):
    result = run(model, *CHAT, "--temperature", "0", code=0)
    report = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"\[\d+ tokens?, first token in [\d,]+ ms(, [\d,.]+ tok/s)?, \d threads?"
                        r", 2bit engine(, --max-new-tokens reached)?\]", report), report
