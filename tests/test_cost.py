"""`bitnet cost` against hand calculations; no torch anywhere, as the command must answer
without it."""

import json
import os
import subprocess
import sys

import pytest

from bitnet_cli.cli import app
from bitnet_cli.report.gpus import GPUS
from tests.cli import runner


BASELINE_TOKENS = 400_000 * 16 * 256 * 2  # the original project's 95M run: 3,276,800,000 tokens


def cost(*args) -> dict:
    result = runner.invoke(app, ["cost", *args, "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    return json.loads(result.stdout)


def gpu(report: dict, name: str) -> dict:
    return next(g for g in report["gpus"] if g["name"] == name)


def test_baseline_flops_hours_and_dollars_by_hand():
    r = cost("--params", "95M", "--steps", "400k", "--batch-size", "16", "--seq-len", "256",
             "--grad-accum", "2", "--layers", "8", "--hidden", "768", "--gpu", "A100-80GB")
    assert r["horizon"]["tokens"] == BASELINE_TOKENS
    assert r["flops"]["dense_6nd"] == 6 * 95_000_000 * BASELINE_TOKENS
    assert f"{r['flops']['dense_6nd']:.3g}" == "1.87e+18"
    total = (6 * 95_000_000 + 12 * 8 * 768 * 256) * BASELINE_TOKENS
    assert r["flops"]["total"] == total
    a100 = gpu(r, "A100-80GB")
    hours = total / (312e12 * 0.30) / 3600  # the A100's dense bf16 peak at the default 30% MFU
    assert a100["gpu_hours"] == pytest.approx(hours, rel=1e-12) and round(hours, 2) == 5.73
    assert a100["dollars"] == pytest.approx(hours * 1.60, rel=1e-12)


def test_overrides_of_peak_mfu_price_and_gpus():
    r = cost("--params", "95M", "--tokens", "2B", "--gpu", "H100", "--peak-tflops", "500",
             "--price", "2.5", "--mfu", "0.4", "--gpus", "4")
    h100 = gpu(r, "H100-SXM")
    hours = r["flops"]["total"] / (500e12 * 0.4) / 3600
    assert h100["gpu_hours"] == pytest.approx(hours, rel=1e-12)
    assert h100["wall_clock_hours"] == pytest.approx(hours / 4, rel=1e-12)  # 4 GPUs, 1/4 the time
    assert h100["dollars"] == pytest.approx(hours * 2.5, rel=1e-12)       # and the same bill


def test_baseline_preset_is_the_exact_model():
    r = cost("--preset", "baseline", "--gpu", "A100-80GB")
    d, L, f, kv, V = 768, 8, 3072, 6 * 64, 32000
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    params = V * d + linear + L * (3 * d + f) + d  # tied embedding, 4 norms a layer, final norm
    assert r["model"]["params"] == params == 95_398_656
    assert r["model"]["ternary_params"] == linear
    assert r["horizon"] == {"tokens": BASELINE_TOKENS, "steps": 400_000, "batch_size": 16,
                            "seq_len": 256, "grad_accum": 2, "basis": "preset"}
    assert r["flops"]["attention"] == 12 * L * d * 256 * BASELINE_TOKENS
    assert r["flops"]["total"] == (6 * params + 12 * L * d * 256) * BASELINE_TOKENS

    training = r["memory"]["training"]
    s, b, heads = 256, 16, 12
    assert training["weights"] + training["gradients"] + training["adamw"] == 16 * params
    megatron = L * s * b * d * (34 + 5 * heads * s / d) + 4 * s * b * (d + V)
    assert training["activations"] == megatron == 1_895_825_408
    assert r["memory"]["inference"] == {"fp16": 2 * params,
                                        "ternary_packed": linear // 4 + 2 * (params - linear)}
    assert gpu(r, "A100-80GB")["fits"]
    # Flags override the preset, and only for that call.
    half = cost("--preset", "baseline", "--batch-size", "8")
    assert half["horizon"]["tokens"] == BASELINE_TOKENS // 2
    assert cost("--preset", "baseline")["horizon"]["tokens"] == BASELINE_TOKENS


def test_experiment_presets_match_their_training_configs():
    r = cost("--preset", "arithmetic")
    assert r["model"]["params"] == 3_156_736 and r["model"]["vocab"] == 18
    assert r["horizon"]["tokens"] == 10_000 * 64 * 64
    assert cost("--preset", "arithmetic-tiny")["model"]["layers"] == 2
    assert cost("--preset", "simple")["model"]["source"] == "simple-tiny"


def test_the_released_2b4t_shape_is_a_preset():
    """BitNet b1.58 2B4T as released: 2.41B parameters with its 128,256-token tied embedding;
    the horizon is a fine-tune's, 1,000 steps of 16 x 4096 unless given."""
    r = cost("--preset", "2b4t", "--gpu", "H100-SXM")
    d, L, f, kv, V = 2560, 30, 6912, 5 * 128, 128256
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * f)
    assert r["model"]["params"] == V * d + linear + L * (3 * d + f) + d
    assert r["model"]["ternary_params"] == linear and r["model"]["layers"] == 30
    assert r["horizon"]["tokens"] == 1000 * 16 * 4096
    assert cost("--preset", "2b4t", "--steps", "200")["horizon"]["tokens"] == 200 * 16 * 4096


def test_default_horizon_is_twenty_tokens_per_parameter():
    r = cost("--params", "1.3B")
    assert r["horizon"]["tokens"] == 26_000_000_000 and r["horizon"]["steps"] is None
    assert [g["name"] for g in r["gpus"]] == [g.name for g in GPUS]  # no --gpu: compare them all


def test_estimated_shape_keeps_the_parameter_count():
    r = cost("--params", "95M", "--tokens", "1B")
    m = r["model"]
    assert m["source"] == "estimated" and m["params"] == 95_000_000 and m["vocab"] == 32000
    assert 6 <= m["layers"] <= 10 and m["hidden"] % 64 == 0
    assert m["ternary_params"] == 95_000_000 - 32000 * m["hidden"]
    assert r["flops"]["dense_6nd"] == 6 * 95_000_000 * 1_000_000_000  # 6·N·D ignores the guess

    pinned = cost("--params", "95M", "--tokens", "1B", "--layers", "8", "--hidden", "768")
    assert pinned["flops"]["attention"] == 12 * 8 * 768 * 256 * 1_000_000_000
    assert cost("--params", "500k")["model"]["vocab"] == 256  # too small for a 32000-token table


def test_a_model_too_big_for_one_gpu_does_not_fit():
    r = cost("--params", "7B", "--tokens", "1B")
    assert not any(g["fits"] for g in r["gpus"])  # 16 B/param alone is 112 GB
    small = cost("--params", "95M", "--tokens", "1B")
    assert all(g["fits"] for g in small["gpus"])


@pytest.mark.parametrize("name, canonical", [
    ("A100-80GB", "A100-80GB"), ("a100", "A100-80GB"), ("h100 sxm", "H100-SXM"),
    ("RTX 4090", "RTX-4090"), ("4090", "RTX-4090"), ("nvidia-t4", "T4"),
])
def test_gpu_names_are_forgiving(name, canonical):
    assert [g["name"] for g in cost("--params", "95M", "--gpu", name)["gpus"]] == [canonical]


def test_tables_by_default():
    result = runner.invoke(app, ["cost", "--preset", "baseline", "--gpu", "A100-80GB"])
    assert result.exit_code == 0, result.output
    for text in ["95.4M parameters", "3.28B", "1.94e18", "6·N·D 1.88e18", "A100-80GB", "5.75 h",
                 "$9.20", "2.85× smaller"]:
        assert text in result.stdout
    every = runner.invoke(app, ["cost", "--params", "95M"]).stdout
    assert all(g.name in every for g in GPUS)


@pytest.mark.parametrize("args, message", [
    (["--params", "95X"], "--params: cannot read '95X' as a size"),
    (["--params", "-5"], "--params: cannot read '-5' as a size"),
    (["--params", "0"], "--params: size must be positive"),
    (["--params", "95M", "--tokens", "0"], "--tokens: size must be positive"),
    (["--params", "95M", "--batch-size", "-1"], "--batch-size must be a positive whole number"),
    (["--params", "95M", "--gpus", "0"], "--gpus must be a positive whole number, got 0"),
    (["--params", "95M", "--gpu", "X100"], "unknown GPU 'X100'; known: H200, H100-SXM"),
    (["--params", "95M", "--mfu", "1.5"], "--mfu is a fraction of the GPU's peak"),
    (["--params", "95M", "--mfu", "0"], "--mfu is a fraction of the GPU's peak"),
    (["--params", "95M", "--gpu", "T4", "--price", "-1"], "--price must be positive, got -1.0"),
    (["--params", "95M", "--price", "2"], "--peak-tflops and --price describe one GPU"),
    (["--params", "95M", "--tokens", "1B", "--steps", "10"], "give --tokens or --steps, not both"),
    (["--params", "95M", "--layers", "4"], "give --layers and --hidden together"),
    (["--params", "1M", "--vocab", "32000"], "smaller than a 32000-token × 64 embedding table"),
    ([], "say what to cost with one of --params 95M, --preset baseline or --from-run RUN"),
    (["--params", "95M", "--preset", "baseline"], "not --params and --preset"),
    (["--preset", "nope"], "unknown preset 'nope'; choose one of: simple, simple-tiny, arithmetic"),
    (["--from-run", "nope"], "no runs in"),
])
def test_bad_input_is_one_clear_line(args, message):
    result = runner.invoke(app, ["cost", *args])
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert result.stdout == ""


# A run folder as `bitnet train` leaves it: arithmetic-5M, 2,000 of 10,000 steps of 64 × 64 tokens.
ARITHMETIC_5M = dict(vocab_size=18, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, intermediate_size=768, max_position_embeddings=64,
                     rope_theta=500000.0, rms_norm_eps=1e-5, initializer_range=0.02,
                     tie_word_embeddings=True, quant="ternary")


def make_run(home, run_id, created_at="2026-01-02T03:04:05+00:00", rate=40_960.0, logged=True,
             device="cuda:0"):
    run = home / "runs" / run_id
    run.mkdir(parents=True)
    train = dict(experiment="arithmetic", size="5M", steps=10_000, batch_size=64, seq_len=64,
                 grad_accum=1, lr=1.5e-3)
    (run / "config.json").write_text(json.dumps(dict(
        run_id=run_id, experiment="arithmetic", size="5M", num_params=3_156_736,
        model=ARITHMETIC_5M, train=train, created_at=created_at)))
    (run / "state.json").write_text(json.dumps(dict(status="running", step=2000 if logged else 0,
                                                    total_steps=10_000, tok_per_s=rate,
                                                    device=device)))
    rows = [dict(step=step, split="train", loss=1.0, tokens=step * 4096,
                 tok_per_s=rate / 10 if step == 10 else rate)  # the first window compiles
            for step in range(10, 2001, 10)] if logged else []
    rows.insert(len(rows) // 2, dict(step=1000, split="eval", loss=1.0, tokens=1000 * 4096))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"cut sh')
    return run


def test_from_run_projects_the_rest_at_its_measured_speed(bitnet_home):
    make_run(bitnet_home, "arithmetic-5M-20260102-030405")
    r = cost("--from-run", "arithmetic-5M-20260102-030405", "--gpu", "A100-80GB")
    assert r["model"]["params"] == 3_156_736 and r["horizon"]["basis"] == "run"
    run = r["run"]
    assert run["step"] == 2000 and run["tok_per_s"] == 40_960
    assert run["tokens_total"] == 10_000 * 4096 and run["tokens_remaining"] == 8000 * 4096
    assert run["remaining_hours"] == pytest.approx(8000 * 4096 / 40_960 / 3600)  # 800 s
    assert run["measured_mfu"] == pytest.approx(40_960 * r["flops"]["per_token"] / 312e12)
    assert run["remaining_dollars"] == pytest.approx(run["remaining_hours"] * 1.60)

    result = runner.invoke(app, ["cost", "--from-run", "latest", "--gpu", "A100-80GB"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "remaining 32.8M tokens take 13.3 min and $0.36 on 1 × A100-80GB" in result.stdout
    done = runner.invoke(app, ["cost", "--from-run", "latest", "--steps", "2000"])
    assert "Nothing is left to train." in done.stdout


def test_a_cpu_run_is_not_priced_as_gpu_time(bitnet_home):
    make_run(bitnet_home, "on-cpu", rate=2_500.0, device="cpu")
    run = cost("--from-run", "on-cpu", "--gpu", "A100-80GB")["run"]
    assert "measured_mfu" not in run and "remaining_dollars" not in run
    assert run["remaining_hours"] == pytest.approx(8000 * 4096 / 2_500 / 3600)
    result = runner.invoke(app, ["cost", "--from-run", "on-cpu", "--gpu", "A100-80GB"],
                           env={"COLUMNS": "200"})
    assert "MFU" not in result.stdout.split("Run on-cpu")[1]
    assert "on its cpu; that speed says nothing of a GPU's" in result.stdout


def test_from_run_finds_runs_by_prefix_latest_and_path(bitnet_home):
    old = make_run(bitnet_home, "arithmetic-5M-20260101-000000", "2026-01-01T00:00:00+00:00")
    new = make_run(bitnet_home, "arithmetic-5M-20260102-000000", "2026-01-02T00:00:00+00:00")
    os.utime(old, (2e9, 2e9))  # a newer folder mtime must not outrank created_at
    assert cost("--from-run", "latest")["run"]["path"] == str(new)
    assert cost("--from-run", "arithmetic-5M-20260101")["run"]["path"] == str(old)
    assert cost("--from-run", str(new))["run"]["path"] == str(new)
    from bitnet_cli.store.checkpoint import step_dir_name  # here only: the rest stays torch-free
    checkpoint = new / "checkpoints" / step_dir_name(10)
    checkpoint.mkdir(parents=True)
    assert cost("--from-run", str(checkpoint))["run"]["path"] == str(new)
    missing = runner.invoke(app, ["cost", "--from-run", str(new / "nowhere")])
    assert missing.exit_code == 1 and "nowhere does not exist" in missing.stderr

    ambiguous = runner.invoke(app, ["cost", "--from-run", "arithmetic"])
    assert ambiguous.exit_code == 1 and "matches 2 runs" in ambiguous.stderr
    unknown = runner.invoke(app, ["cost", "--from-run", "arithmetic-5M-20260103-000000"])
    assert unknown.exit_code == 1 and "closest: arithmetic-5M-2026010" in unknown.stderr


def test_from_run_without_a_logged_step_still_costs_it(bitnet_home):
    make_run(bitnet_home, "fresh", rate=None, logged=False)
    r = cost("--from-run", "fresh")
    assert r["run"]["tok_per_s"] is None and r["run"]["remaining_hours"] is None
    assert r["horizon"]["tokens"] == 10_000 * 4096
    assert "not logged a step" in runner.invoke(app, ["cost", "--from-run", "fresh"]).stdout


def test_cost_answers_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from bitnet_cli.cli import app; "
            "r = CliRunner().invoke(app, ['cost', '--preset', 'baseline']); "
            "assert r.exit_code == 0, r.output; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_help_is_the_manual():
    result = runner.invoke(app, ["cost", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in ["6·N·D + 12·L·d·T·D", "Korthikanti", "20 tokens per parameter",
                 "--peak-tflops", "bitnet cost --preset baseline --gpu A100-80GB", "RTX-3060"]:
        assert text in result.stdout


def test_a_cpu_step_is_checked_against_float32_activations(monkeypatch):
    """CPU training runs in float32: its activations take twice the 16-bit formula's bytes, so
    a step that fits in bf16 but not in float32 is refused on a CPU before it starts."""
    import torch

    from bitnet_cli.config.building import build_configs
    from bitnet_cli.errors import BitnetError
    from bitnet_cli.report.cost import training_bytes
    from bitnet_cli.training import setup
    model, train = build_configs("tinystories", "tiny")
    half = training_bytes(model, train.batch_size, train.seq_len, activation_bytes=2)
    full = training_bytes(model, train.batch_size, train.seq_len, activation_bytes=4)
    assert half < full < 2 * half  # the layers' activations double; weights and logits do not
    monkeypatch.setattr(setup, "free_memory", lambda device: (half + full) // 2)
    with pytest.raises(BitnetError, match="lower --batch-size"):
        setup.check_memory(model, train, torch.device("cpu"), 1)
