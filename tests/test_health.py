"""Inside a ternary run: code shares, flips, scales and input absmax at every evaluation (status,
plot), runs side by side (compare), and the same rows as TensorBoard event files."""

import json
import shutil

import pytest
import torch

from bitnet_cli.nn.bitlinear import BitLinear, ternary_codes
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.training.health import TernaryHealth, bitlinear_layers
from bitnet_cli.nn.model import BitNetForCausalLM
from tests.cli import home_at, invoke

STEPS, EVERY = 60, 20
ARGS = ("simple", "--steps", str(STEPS), "--eval-every", str(EVERY), "--save-every", "30",
        "--no-compile")


def rows(home, name, split):
    lines = (home / "runs" / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A ternary run (with TensorBoard), its --quant none twin, and an arithmetic run."""
    home = tmp_path_factory.mktemp("health-home")
    with home_at(home):
        invoke("train", *ARGS, "--name", "ternary", "--tensorboard")
        invoke("train", *ARGS, "--name", "twin", "--quant", "none")
        invoke("train", "arithmetic", "--size", "tiny", "--steps", "10", "--eval-every", "10",
               "--no-compile", "--name", "sums")
    return home


@pytest.fixture
def home(runs, bitnet_home):
    shutil.copytree(runs / "runs", bitnet_home / "runs")
    return bitnet_home


def small_model():
    torch.manual_seed(0)
    return BitNetForCausalLM(ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         intermediate_size=64, max_position_embeddings=16))


def test_shares_flips_scale_and_absmax_are_what_they_say():
    model = small_model()
    health = TernaryHealth(model, step=0)
    layers = bitlinear_layers(model)
    assert list(layers)[0] == "0.self_attn.q_proj" and len(layers) == 14
    inputs = torch.randint(0, 40, (3, 16))
    seen = {}
    hook = layers["1.mlp.down_proj"].register_forward_pre_hook(
        lambda module, args: seen.setdefault("x", args[0].detach().clone()))
    with torch.no_grad(), health.watching_inputs():
        model(inputs)
    hook.remove()

    # Flip exactly 10 codes of one layer: a weight of code 0 pushed to +1.
    layer = layers["0.mlp.up_proj"]
    codes = ternary_codes(layer.weight)[0]
    zeros = (codes == 0).flatten().nonzero()[:10, 0]
    with torch.no_grad():
        layer.weight.view(-1)[zeros] = layer.weight.abs().mean() * 1.4
    flipped = int((ternary_codes(layer.weight)[0] != codes).sum())  # the scale moved a little too
    row = health.measure(step=20)

    assert row["split"] == "ternary" and row["flips_since"] == 0
    for name, module in layers.items():
        count = module.weight.numel()
        mine = ternary_codes(module.weight)[0]
        assert row[f"minus/{name}"] + row[f"zeros/{name}"] + row[f"plus/{name}"] == pytest.approx(1)
        assert row[f"zeros/{name}"] == pytest.approx(int((mine == 0).sum()) / count)
        assert row[f"scale/{name}"] == pytest.approx(module.weight.abs().mean().item())
        if name != "0.mlp.up_proj":
            assert row[f"flips/{name}"] == 0
    assert row["flips/0.mlp.up_proj"] == flipped / layer.weight.numel() and flipped >= 10
    total = sum(m.weight.numel() for m in layers.values())
    assert row["flips"] == pytest.approx(flipped / total)
    assert row["act_absmax/1.mlp.down_proj"] == pytest.approx(
        seen["x"].abs().amax(dim=-1).mean().item(), rel=1e-5)
    again = health.measure(step=40)  # measured against the codes of step 20 now
    assert again["flips"] == 0 and again["flips_since"] == 20


def test_a_full_precision_model_has_no_codes():
    model = BitNetForCausalLM(ModelConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=64, max_position_embeddings=16,
                                          quant="none"))
    assert not TernaryHealth(model, 0).active
    assert not any(isinstance(m, BitLinear) for m in model.modules())


def test_every_evaluation_of_a_ternary_run_logs_its_codes(runs):
    evals, ternary = rows(runs, "ternary", "eval"), rows(runs, "ternary", "ternary")
    assert [r["step"] for r in ternary] == [r["step"] for r in evals] == [20, 40, 60]
    assert [r["flips_since"] for r in ternary] == [0, 20, 40]
    for row in ternary:
        assert 0 < row["zeros"] < 1 and 0 < row["flips"] < 1 and row["scale"] > 0
        assert row["minus"] + row["zeros"] + row["plus"] == pytest.approx(1)
        assert row["act_absmax"] > 0 and len([k for k in row if k.startswith("zeros/")]) == 14
    assert rows(runs, "twin", "ternary") == []


def test_status_shows_the_codes(home):
    detail = json.loads(invoke("status", "ternary", "--json").stdout)
    assert [r["step"] for r in detail["recent_ternary"]] == [20, 40, 60]
    assert set(detail["ternary_layers"]["1.mlp.down_proj"]) == {
        "minus", "zeros", "plus", "flips", "scale", "act_absmax"}
    text = invoke("status", "ternary").stdout
    assert "ternary codes by layer at step 60" in text and "1.mlp.down_proj" in text
    assert "ternary codes: none, this is a --quant none" in invoke("status", "twin").stdout


def test_plot_draws_the_codes(home, tmp_path):
    text = invoke("plot", "ternary", "--metric", "flips").stdout
    assert "flips" in text and "step 20" in text
    invoke("plot", "ternary", "--metric", "zeros", "--by-layer", "--out", tmp_path / "z.png")
    assert (tmp_path / "z.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for args, message in [
            (("twin", "--metric", "zeros"), "is a --quant none (full-precision) run"),
            (("ternary", "--by-layer"), "--by-layer goes with a ternary metric")]:
        result = invoke("plot", *args, code=1)
        assert message in result.stderr and result.stderr.count("\n") == 1


def test_compare_puts_a_run_beside_its_twin(home, tmp_path):
    report = json.loads(invoke("compare", "twin", "ternary", "--json").stdout)
    twin, ternary = report["runs"]
    assert report["headline"] == "acc" and report["metrics"][0] == "acc"
    assert twin["ratio"]["loss"] == 1  # (acc: None where the first run scores 0)
    assert ternary["ratio"]["loss"] == pytest.approx(ternary["final"]["loss"] / twin["final"]["loss"])
    assert [p["tokens"] for p in ternary["curve"]] == [r["tokens"] for r in rows(home, "ternary", "eval")]
    text = invoke("compare", "twin", "ternary", "--out", tmp_path / "c.png").stdout
    assert "twin" in text and "ternary" in text and "x)" in text
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (("ternary", "sums"), "run sums is arithmetic and run ternary is simple"),
    (("ternary", "nope"), "no run 'nope'"),
    (("ternary",), "compare needs two or more runs"),
    (("ternary", "ternary"), "a run is named twice"),
    (("ternary", "twin", "--out", "x.txt"), "must end in one of"),
])
def test_compare_refuses_in_one_line(home, args, message):
    result = invoke("compare", *args, code=1)
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_compare_waits_for_an_evaluation(home):
    (home / "runs" / "twin" / "metrics.jsonl").write_text("")
    result = invoke("compare", "ternary", "twin", code=1)
    assert "run twin has no evaluations yet" in result.stderr


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_tensorboard_reads_back_the_same_rows(home):
    run = home / "runs" / "ternary"
    for split, key in (("train", "loss"), ("eval", "acc"), ("ternary", "flips")):
        assert tensorboard_scalars(run, f"{split}/{key}") == [
            (r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows(home, "ternary", split)]
    # Resumed from step 30 (as after a crash there): each step shows once, with the new values.
    shutil.rmtree(run / "checkpoints" / "step_000000060")
    (run / "checkpoints" / "latest").write_text("step_000000030")
    invoke("resume", "ternary")
    assert [step for step, _ in tensorboard_scalars(run, "train/loss")] == list(range(5, 61, 5))
    assert tensorboard_scalars(run, "train/loss") == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in rows(home, "ternary", "train")]


def test_resume_turns_tensorboard_on(home):
    invoke("resume", "twin", "--steps", "80", "--tensorboard")
    assert json.loads((home / "runs" / "twin" / "config.json").read_text())["train"]["tensorboard"]
    assert [s for s, _ in tensorboard_scalars(home / "runs" / "twin", "eval/loss")] == [80]


def test_without_tensorboard_installed_one_line(home, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorboard" else find_spec(name, *a))
    before = sorted(p.name for p in (home / "runs").iterdir())
    for args in (("train", *ARGS, "--name", "new", "--tensorboard"),
                 ("resume", "twin", "--steps", "80", "--tensorboard"),
                 ("resume", "ternary", "--steps", "80")):  # trained with it
        result = invoke(*args, code=1)
        assert "pip install 'bitnet-cli[tensorboard]'" in result.stderr
        assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in (home / "runs").iterdir()) == before


def test_a_resume_from_step_zero_keeps_tensorboard_to_one_event_per_step(bitnet_home):
    """A run killed before its first checkpoint trains again from step 0: TensorBoard must not
    keep the first session's events beside the new ones."""
    invoke("train", "simple", "--steps", "10", "--eval-every", "10", "--save-every", "10",
           "--no-compile", "--name", "early", "--tensorboard")
    run = bitnet_home / "runs" / "early"
    shutil.rmtree(run / "checkpoints")
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "status": "interrupted", "step": 7}))
    invoke("resume", "early")
    assert [step for step, _ in tensorboard_scalars(run, "train/loss")] == [5, 10]
    assert [row["step"] for row in rows(bitnet_home, "early", "train")] == [5, 10]
