import json
import subprocess
import sys

import pytest
from safetensors import safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer

from bitnet_cli.store.checkpoint import latest_checkpoint, step_dir_name
from bitnet_cli.cli import app
from bitnet_cli.config.settings import train_options
from tests.test_model import expected_keys
from tests.cli import runner

FAST = ["--steps", "12", "--eval-every", "6", "--save-every", "4", "--no-compile"]


def train(*args):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 0, result.output + result.stderr
    return result


def only_run(home):
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1
    return runs[0]


def test_simple_run_leaves_a_complete_run_folder(bitnet_home):
    train("simple", *FAST, "--name", "first")
    run = bitnet_home / "runs" / "first"
    config = json.loads((run / "config.json").read_text())
    assert config["experiment"] == "simple" and config["size"] == "tiny"
    assert config["model"]["quant"] == "ternary" and config["train"]["steps"] == 12
    assert config["argv"][:3] == ["bitnet", "train", "simple"]
    state = json.loads((run / "state.json").read_text())
    assert state["status"] == "finished" and state["step"] == 12
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in rows if r["split"] == "train"]
    assert train_steps == sorted(set(train_steps)) and train_steps[-1] == 12
    assert [r["step"] for r in rows if r["split"] == "eval"] == [6, 12]
    assert all({"loss", "lr", "wd", "grad_norm", "tokens", "tok_per_s"} <= r.keys()
               for r in rows if r["split"] == "train")
    assert {"loss", "acc", "acc/short", "acc/long"} <= next(r for r in rows if r["split"] == "eval").keys()

    tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    assert tok.decode(tok.encode("d3=efg;").ids) == "d3=efg;"

    ckpts = run / "checkpoints"
    # Saved at 4, 8, 12; the last three are kept and `latest` names the newest.
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        step_dir_name(4), step_dir_name(8), step_dir_name(12)]
    assert latest_checkpoint(ckpts).name == step_dir_name(12)
    assert not list(ckpts.glob("*.partial"))
    step = ckpts / step_dir_name(12)
    with safe_open(str(step / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == expected_keys(config["model"]["num_hidden_layers"], tied=True)
    trainer = json.loads((step / "trainer.json").read_text())
    assert trainer["step"] == 12 and "rng" in trainer and "data" in trainer
    assert load_file(str(step / "optim.safetensors"))  # optimizer moments are stored


def test_checkpoints_beyond_keep_are_pruned(bitnet_home):
    train("simple", "--steps", "10", "--save-every", "2", "--eval-every", "10", "--no-compile")
    ckpts = only_run(bitnet_home) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == [
        step_dir_name(6), step_dir_name(8), step_dir_name(10)]


def test_same_seed_gives_bit_identical_weights(bitnet_home):
    train("simple", *FAST, "--seed", "7", "--name", "a")
    train("simple", *FAST, "--seed", "7", "--name", "b")
    train("simple", *FAST, "--seed", "8", "--name", "c")
    files = {n: (bitnet_home / "runs" / n / "checkpoints" / step_dir_name(12) /
                 "model.safetensors").read_bytes() for n in "abc"}
    assert files["a"] == files["b"]
    assert files["a"] != files["c"]


def test_quant_none_trains_the_twin(bitnet_home):
    train("arithmetic", "--size", "tiny", "--quant", "none", "--steps", "3", "--eval-every", "3",
          "--no-compile", "--batch-size", "4")
    config = json.loads((only_run(bitnet_home) / "config.json").read_text())
    assert config["model"]["quant"] == "none"


@pytest.mark.parametrize("args, message", [
    (["nonsense"], "unknown experiment 'nonsense'"),
    (["simple", "--steps", "0"], "--steps must be a whole number from 1 to 999,999,999, got 0"),
    (["simple", "--steps", "-5"], "--steps must be a whole number from 1 to 999,999,999, got -5"),
    (["simple", "--batch-size", "0"], "--batch-size must be a whole number from 1 to 1,048,576, got 0"),
    (["simple", "--size", "huge"], "unknown size 'huge' for simple"),
    (["simple", "--quant", "binary"], "--quant must be one of ternary, none"),
    (["simple", "--lr", "0"], "--lr must be a positive finite number, got 0.0"),
    (["simple", "--device", "tpu"], "--device must be one of"),
    (["simple", "--name", "../escape"], "--name '../escape' may only use"),
])
def test_bad_input_is_one_clear_line(bitnet_home, args, message):
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.output
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())


def test_missing_device_is_a_clear_error(bitnet_home):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = runner.invoke(app, ["train", "simple", "--device", "cuda"])
    assert result.exit_code == 1
    assert "--device cuda is not available here" in result.stderr
    assert not (bitnet_home / "runs").exists() or not any((bitnet_home / "runs").iterdir())


def test_bitnet_home_that_is_a_file(tmp_path, monkeypatch):
    home = tmp_path / "afile"
    home.write_text("not a folder")
    monkeypatch.setenv("BITNET_HOME", str(home))
    result = runner.invoke(app, ["train", "simple", "--steps", "1"])
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: BITNET_HOME {home} is a file, not a folder; point " \
                                    "BITNET_HOME (or --home) at a folder"
    assert home.read_text() == "not a folder"


def test_named_run_is_never_clobbered(bitnet_home):
    train("simple", "--steps", "2", "--eval-every", "2", "--no-compile", "--name", "keep")
    before = (bitnet_home / "runs/keep/config.json").read_bytes()
    result = runner.invoke(app, ["train", "simple", "--steps", "3", "--name", "keep"])
    assert result.exit_code == 1 and "already exists" in result.stderr
    assert (bitnet_home / "runs/keep/config.json").read_bytes() == before


def test_every_setting_flag_reaches_the_run_config(bitnet_home):
    """`train`'s flags are derived from the config fields: each one given lands in config.json."""
    given = {"size": "tiny", "steps": 3, "batch_size": 8, "seq_len": 16, "lr": 0.002,
             "grad_accum": 2, "seed": 5, "eval_every": 2, "save_every": 3, "device": "cpu",
             "compile": False, "foreground": True, "name": "flags", "quant": "none",
             "activation": "silu"}
    tested_elsewhere = {"data", "vocab_size", "tensorboard", "init_from", "teacher",
                        "distill_weight", "distill_temperature", "distill_layer"}  # test_text.py,
    # test_health.py, test_import.py, test_distill.py
    assert {field.name for field, _ in train_options()} == given.keys() | tested_elsewhere
    switches = {"compile": "--no-compile", "foreground": "--foreground"}
    args = list(switches.values()) + [a for key, value in given.items() if key not in switches
                                      for a in ("--" + key.replace("_", "-"), str(value))]
    train("simple", *args)
    config = json.loads((bitnet_home / "runs" / "flags" / "config.json").read_text())
    assert {key: {**config["train"], **config["model"]}[key] for key in given} == given


def test_cli_imports_no_torch():
    code = "import bitnet_cli.cli, sys; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_and_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("bitnet ")
    result = runner.invoke(app, ["train", "--help"])
    assert result.exit_code == 0 and "arithmetic" in result.stdout
    for command in ["resume", "status", "plot", "chat", "play", "eval", "cost", "export", "bench"]:
        assert runner.invoke(app, [command, "--help"]).exit_code == 0


def test_a_checkpoint_folder_alone_loads_the_model(bitnet_home, tmp_path):
    import shutil

    import torch

    from bitnet_cli.use.loading import load_model
    train("simple", "--steps", "4", "--save-every", "4", "--eval-every", "4", "--no-compile",
          "--name", "alone")
    copy = tmp_path / "elsewhere"
    shutil.copytree(bitnet_home / "runs/alone/checkpoints" / step_dir_name(4), copy)
    shutil.rmtree(bitnet_home / "runs")
    loaded = load_model(str(copy))
    assert loaded.experiment == "simple" and loaded.step == 4
    ids = loaded.tokenizer.encode("d3=").ids
    logits = loaded.model(torch.tensor([ids]))
    assert logits.shape == (1, 3, loaded.config.vocab_size)
