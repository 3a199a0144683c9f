"""Conversions and distillation as status, compare and cost show them, on run folders written by
hand: no training, and no torch but where a test says so."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_cli.cli import app
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.report.cost import teacher_bytes
from bitnet_cli.ui.live import starting_point
from tests.cli import invoke, runner
from tests.test_cost import ARITHMETIC_5M, cost, make_run

TEACHER_MODEL = dict(ARITHMETIC_5M, hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=4, intermediate_size=1536, quant="none")
TOKENS = 10_000 * 64 * 64  # make_run's steps × batch × seq
DISTILL = dict(distill_weight=10.0, distill_temperature=5.0, distill_layer=-1,
               distill_attention_weight=1.0)


def teacher_checkpoint(home):
    """A full-precision run with one checkpoint folder (only its trainer.json: no torch)."""
    run = make_run(home, "fp")
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps(dict(config, model=TEACHER_MODEL)))
    folder = run / "checkpoints" / "step_100"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text(json.dumps({"step": 100, "model": TEACHER_MODEL}))
    return folder


def student(home, name="student", converted=True, **train):
    """A run converted from the teacher's checkpoint and distilled from it."""
    run = make_run(home, name)
    config = json.loads((run / "config.json").read_text())
    config["train"].update(train)
    if converted:
        config["converted"] = {"from_quant": "none", "sub_norms_inserted": True}
    (run / "config.json").write_text(json.dumps(config))
    return run


def text(*args) -> str:
    result = runner.invoke(app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output + result.stderr
    return " ".join(result.stdout.replace("│", " ").split())  # words, without a table's lines


@pytest.fixture
def runs(bitnet_home):
    teacher = str(teacher_checkpoint(bitnet_home))
    student(bitnet_home, init_from=teacher, teacher=teacher, **DISTILL)
    make_run(bitnet_home, "plain")  # an older run: none of these fields
    return teacher


def test_status_shows_a_conversion_and_its_teacher(runs):
    row = json.loads(invoke("status", "student", "--json").stdout)
    assert row["init_from"] == runs
    assert row["converted"] == {"from_quant": "none", "sub_norms_inserted": True}
    assert row["teacher"] == {"path": runs, "weight": 10.0, "temperature": 5.0, "layer": -1,
                              "attention_weight": 1.0}
    listed = {r["run_id"]: r for r in json.loads(invoke("status", "--json").stdout)}
    assert listed["student"]["teacher"]["path"] == runs
    shown = text("status", "student")
    assert f"source converted to ternary from {runs} (sub-norms inserted)" in shown
    assert f"teacher {runs}, weight 10, temperature 5, layer -1 relations at weight 1" in shown
    assert "fine-tuned" not in shown


def test_a_fine_tune_and_an_older_run_still_render(runs, bitnet_home):
    student(bitnet_home, "tuned", converted=False, init_from=runs)
    assert f"source fine-tuned from {runs}" in text("status", "tuned")
    row = json.loads(invoke("status", "plain", "--json").stdout)
    assert row["init_from"] is row["converted"] is row["teacher"] is None
    shown = text("status", "plain")
    assert "teacher" not in shown and "source" not in shown


def test_compare_shows_each_runs_source_and_teacher(runs):
    report = json.loads(invoke("compare", "plain", "student", "--json").stdout)
    plain, distilled = report["runs"]
    assert plain["teacher"] is plain["init_from"] is plain["converted"] is None
    assert distilled["teacher"]["temperature"] == 5.0 and distilled["converted"]["from_quant"] == "none"
    shown = text("compare", "plain", "student")
    assert "from - fp/step_100 (converted)" in shown and "teacher - fp/step_100" in shown
    assert "distill - weight 10, temperature 5, layer -1 relations at weight 1" in shown
    assert "teacher" not in text("compare", "plain", "fp")  # none has one: no such rows


def test_cost_from_run_adds_the_teachers_forward_pass_and_memory(runs):
    plain, distilled = cost("--from-run", "plain"), cost("--from-run", "student")
    teacher = ModelConfig(**TEACHER_MODEL)
    dense = 2 * teacher.num_params() * TOKENS
    attention = 4 * teacher.num_hidden_layers * teacher.hidden_size * 64 * TOKENS
    assert distilled["flops"]["teacher_2nd"] == dense and plain["flops"]["teacher_2nd"] == 0
    assert distilled["flops"]["teacher_attention"] == attention
    assert distilled["flops"]["total"] - plain["flops"]["total"] == dense + attention
    assert (distilled["memory"]["training"]["total"] - plain["memory"]["training"]["total"]
            == distilled["memory"]["training"]["teacher"] == teacher_bytes(teacher, 64, 64))
    assert distilled["teacher"]["params"] == teacher.num_params() and "teacher" not in plain
    shown = text("cost", "--from-run", "student")
    assert "Teacher" in shown and "teacher forward 2·N·D" in shown and f"{runs}" in shown


def test_a_teacher_gone_is_noted_and_left_out(runs, bitnet_home):
    (bitnet_home / "runs/fp/checkpoints/step_100/trainer.json").unlink()
    os.rmdir(bitnet_home / "runs/fp/checkpoints/step_100")
    plain, distilled = cost("--from-run", "plain"), cost("--from-run", "student")
    assert "does not exist" in distilled["teacher"]["missing"]
    assert distilled["flops"] == plain["flops"] and "teacher" not in distilled["memory"]["training"]
    assert "unreadable, costed without it" in text("cost", "--from-run", "student")


def test_cost_prices_a_planned_distillation(runs):
    plain = cost("--preset", "arithmetic-5M")
    by_run, by_folder = (cost("--preset", "arithmetic-5M", "--teacher", t) for t in ("fp", runs))
    assert by_run["flops"] == by_folder["flops"]
    tokens = plain["horizon"]["tokens"]
    teacher = ModelConfig(**TEACHER_MODEL)
    assert by_run["flops"]["teacher_2nd"] == 2 * teacher.num_params() * tokens
    assert by_run["flops"]["total"] > plain["flops"]["total"]
    result = runner.invoke(app, ["cost", "--preset", "arithmetic-5M", "--teacher", "nope"])
    assert result.exit_code == 1 and "--teacher nope: no run 'nope'" in result.stderr
    assert result.stderr.count("\n") == 1


def test_status_compare_and_cost_of_distilled_runs_import_no_torch(runs):
    code = ("import sys; from bitnet_cli.cli import app\n"
            "for args in (['status'], ['status', 'student'], ['compare', 'plain', 'student'],"
            " ['cost', '--from-run', 'student'], ['cost', '--preset', 'arithmetic', '--teacher',"
            " 'fp']):\n"
            "    try:\n        app(args)\n    except SystemExit as e:\n        assert not e.code, e\n"
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_live_view_says_it_distils():
    assert starting_point({"teacher": "/t"}) == "from scratch, distilling from /t"
    assert (starting_point({"init_from": "/s", "teacher": "/t"})
            == "starting from the weights of /s, distilling from /t")


def test_a_conversion_is_recorded_in_config_json(monkeypatch):
    """run_config says whether the run converts, by the source's model (torch: setup.py)."""
    from types import SimpleNamespace

    from bitnet_cli.config.building import build_configs
    from bitnet_cli.training import setup
    model, train = build_configs("arithmetic", "tiny", init_from="/src")
    task = SimpleNamespace(headline="acc")
    for source, expected in [
            (ModelConfig(**dict(TEACHER_MODEL, sub_norms=False)),
             {"from_quant": "none", "sub_norms_inserted": True}),
            (ModelConfig(**TEACHER_MODEL), {"from_quant": "none", "sub_norms_inserted": False}),
            (ModelConfig(**dict(TEACHER_MODEL, quant="ternary")), None)]:
        monkeypatch.setattr(setup, "checkpoint_model", lambda path: source)
        config = setup.run_config("r", "arithmetic", task, model, train, [])
        assert config.get("converted") == expected
    train.init_from = None
    assert "converted" not in setup.run_config("r", "arithmetic", task, model, train, [])
