"""An imported run is its own kind (issue #36): config.json says where it came from and what
shape it has, with no stand-in training schedule; status, chat, eval and cost say "imported",
never a `baseline` of 0/1 steps; a run imported before this still shows as imported."""

import json

import pytest
import torch

from bitnet_cli.cli import app
from tests.cli import invoke, optional, runner
from tests.test_import import SHAPE, bitnet_quantization, packed, write_source

WORDS = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A small 2B4T-layout folder with packed codes, context 128."""
    transformers = optional("transformers")
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(
        hidden_act="relu2", rope_theta=500000.0, tie_word_embeddings=True, **SHAPE))
    return write_source(tmp_path_factory.mktemp("sources") / "tiny-b1.58", model,
                        bitnet_quantization("offline"), packed(model.state_dict()))


def flat(text: str) -> str:
    return " ".join(text.split())


def old_style(run):
    """The run as imports wrote it before config.json had a kind: a 95M baseline TrainConfig of
    1 step, experiment baseline, size imported, state total_steps 0."""
    config = json.loads((run / "config.json").read_text())
    del config["kind"]
    config.update(experiment="baseline", size="imported", headline="loss", train=dict(
        experiment="baseline", size="imported", steps=1, batch_size=16, seq_len=256, lr=0.0015,
        grad_accum=2, warmup_steps=375, name=run.name))
    (run / "config.json").write_text(json.dumps(config))
    state = json.loads((run / "state.json").read_text())
    (run / "state.json").write_text(json.dumps({**state, "step": 0, "total_steps": 0}))


@pytest.mark.parametrize("style", ["new", "old"])
def test_status_shows_an_imported_run_as_imported(source, bitnet_home, style):
    invoke("import", source, "--name", "released")
    run = bitnet_home / "runs" / "released"
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "imported" and not {"train", "experiment", "size"} & set(config)
    assert config["imported"] == {"source": str(source.resolve()), "layout": "bitnet",
                                  "quantization": "offline autobitlinear"}
    assert config["model"]["max_position_embeddings"] == 128
    assert config["num_params"] == 1_313_536 and "created_at" in config
    if style == "old":
        old_style(run)
    table = runner.invoke(app, ["status"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.output
    row = flat(next(line for line in table.stdout.splitlines() if "released" in line))
    assert "released imported - " in row and "imported tiny-b1.58 (bitnet, packed)" in row
    assert "0/1" not in row and "baseline" not in row
    detail = flat(runner.invoke(app, ["status", "released"], env={"COLUMNS": "200"}).stdout)
    assert ("model imported, 1.31M params, 2 layers x 256, 4/2 heads, context 128, vocab 512, "
            "relu2") in detail
    assert f"imported from {source.resolve()}, bitnet layout, packed weights" in detail
    assert "baseline" not in detail and "training" not in detail and "step 0" not in detail
    row = json.loads(invoke("status", "--json").stdout)[0]
    assert row["kind"] == "imported" and row["imported"]["layout"] == "bitnet"
    assert row["experiment"] is None and row["step"] is None and row["total_steps"] is None
    assert "was imported, not trained here" in invoke("resume", "released", code=1).output


def test_a_hub_id_is_kept_as_the_source(source, bitnet_home, monkeypatch):
    """The hub's cache folder is no place to find the model again: the id is."""
    from bitnet_cli.use import importing
    monkeypatch.setattr(importing, "find_source", lambda name: source)
    invoke("import", "someone/tiny-b1.58")
    config = json.loads((bitnet_home / "runs" / "tiny-b1.58" / "config.json").read_text())
    assert config["imported"]["source"] == "someone/tiny-b1.58"


def test_chat_and_eval_name_an_imported_model(source, bitnet_home, tmp_path):
    invoke("import", source, "--name", "released")
    named = (f"imported model released (from {source.resolve()}, bitnet layout, packed weights)")
    chat = runner.invoke(app, ["chat", "released", "--raw", "--temperature", "0"],
                         input="/quit\n")
    assert chat.exit_code == 0, chat.output + chat.stderr
    assert f"{named}, context 128 tokens, 2bit engine." in chat.stderr
    assert "baseline" not in chat.stderr and "step 0" not in chat.stderr
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(" ".join(WORDS[(i * 7 + j * 3) % 8] for j in range(60))
                                for i in range(400)))
    shown = flat(runner.invoke(app, ["eval", "released", "--data", str(text)],
                               env={"COLUMNS": "300"}).stdout)
    assert f"model {named}, 1.31M parameters" in shown and "baseline" not in shown
    report = json.loads(invoke("eval", "released", "--data", text, "--json").stdout)
    assert report["model"] == named and report["experiment"] is None
    assert report["imported"]["layout"] == "bitnet"
    refused = invoke("eval", "released", code=1)
    assert "released is an imported model: it has no held-out text of its own" in refused.output


def test_chat_and_eval_name_a_trained_model_by_experiment_and_step(tmp_path):
    from tests.models import random_checkpoint
    checkpoint = random_checkpoint(tmp_path / "run", "arithmetic")
    chat = runner.invoke(app, ["chat", str(checkpoint)], input="/quit\n")
    assert chat.exit_code == 0, chat.output + chat.stderr
    assert "arithmetic model, step 1, context 32 tokens" in chat.stderr


@pytest.mark.parametrize("style", ["new", "old"])
def test_cost_prices_a_fine_tune_of_an_imported_run_within_its_context(source, bitnet_home,
                                                                       style):
    invoke("import", source, "--name", "released")
    if style == "old":
        old_style(bitnet_home / "runs" / "released")
    r = json.loads(invoke("cost", "--from-run", "released", "--json").stdout)
    h = r["horizon"]
    assert (h["steps"], h["batch_size"], h["seq_len"], h["grad_accum"]) == (1000, 16, 128, 1)
    assert h["basis"] == "fine-tune" and h["tokens"] == 1000 * 16 * 128
    assert r["model"]["context"] == 128 and r["fine_tune_of"]["run_id"] == "released"
    assert "run" not in r  # nothing trained here to project
    shown = flat(runner.invoke(app, ["cost", "--from-run", "released"],
                               env={"COLUMNS": "200"}).stdout)
    assert "Run released was imported, not trained here: this prices fine-tuning it" in shown
    assert "1k steps × 16 × 128 × 1" in shown and "step 0" not in shown
    shorter = json.loads(invoke("cost", "--from-run", "released", "--seq-len", "64",
                                "--steps", "10", "--json").stdout)["horizon"]
    assert shorter["tokens"] == 10 * 16 * 64
    refused = invoke("cost", "--from-run", "released", "--seq-len", "256", code=1)
    assert ("--seq-len 256 is longer than the context of imported run released (128 tokens)"
            in refused.stderr)
