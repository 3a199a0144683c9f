import pytest

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.training.optim import (FINAL, STAGE1_END, STAGE2_START, apply_schedule, build_optimizer,
                              lr_factor, parameter_groups, weight_decay_at)


def test_two_stage_schedule():
    total, warmup = 1000, 100
    f = [lr_factor(s, total, warmup) for s in range(total)]
    assert f[0] == pytest.approx(1 / warmup)
    assert f[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:warmup - 1], f[1:warmup]))  # warmup rises
    assert all(a >= b for a, b in zip(f[warmup:499], f[warmup + 1:500]))  # stage one decays
    assert f[499] == pytest.approx(STAGE1_END, abs=1e-4)
    assert f[500] == pytest.approx(STAGE2_START)  # the sudden drop at the midpoint
    assert f[499] - f[500] > 0.15
    assert all(a >= b for a, b in zip(f[500:], f[501:]))
    assert f[-1] == pytest.approx(FINAL)


def test_schedule_for_runs_shorter_than_warmup():
    f = [lr_factor(s, 10, 100) for s in range(10)]
    assert max(f) <= 1.0 and f[-1] == pytest.approx(FINAL)


def test_weight_decay_only_in_stage_one():
    assert weight_decay_at(0, 100, 0.1) == 0.1
    assert weight_decay_at(49, 100, 0.1) == 0.1
    assert weight_decay_at(50, 100, 0.1) == 0.0


def test_extension_rewarms_then_anneals_without_a_jump():
    planned, total, warmup = 1000, 2000, 100
    f = [lr_factor(s, total, warmup, [planned]) for s in range(total)]
    assert f[:planned] == [lr_factor(s, planned, warmup) for s in range(planned)]
    assert f[planned - 1] == pytest.approx(FINAL)
    assert 0 < f[planned] - f[planned - 1] < STAGE2_START / warmup  # no jump at the extension
    rewarm = f[planned:planned + warmup]
    assert all(a < b for a, b in zip(rewarm, rewarm[1:]))
    assert f[planned + warmup - 1] == pytest.approx(STAGE2_START)
    anneal = f[planned + warmup - 1:]
    assert all(a >= b for a, b in zip(anneal, anneal[1:]))
    assert f[-1] == pytest.approx(FINAL)
    wd = [weight_decay_at(s, total, 0.1, [planned]) for s in range(total)]
    assert wd[:planned // 2] == [0.1] * (planned // 2) and not any(wd[planned // 2:])


def test_each_extension_starts_from_the_rate_before_it():
    marks, total, warmup = [100, 150, 151], 160, 40
    f = [lr_factor(s, total, warmup, marks) for s in range(total)]
    for mark in marks:
        assert abs(f[mark] - f[mark - 1]) <= STAGE2_START / 2
    assert f[100 + 25 - 1] == pytest.approx(STAGE2_START)  # warmup is at most half the extension
    assert f[150] == pytest.approx(FINAL)  # a one-step extension stays at the final rate
    assert max(f[100:]) == pytest.approx(STAGE2_START) and f[-1] == pytest.approx(FINAL)


def test_apply_schedule_honours_extensions():
    model = BitNetForCausalLM(ModelConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1,
                                          intermediate_size=32, max_position_embeddings=8))
    opt = build_optimizer(model, 1e-3, 0.1, "cpu")
    assert apply_schedule(opt, 10, 100, 1e-3, 5, 0.1) == (1e-3 * lr_factor(10, 100, 5), 0.1)
    lr, wd = apply_schedule(opt, 100, 200, 1e-3, 5, 0.1, [100])
    assert lr == pytest.approx(1e-3 * (FINAL + (STAGE2_START - FINAL) / 5)) and wd == 0.0
    assert [g["lr"] for g in opt.param_groups] == [lr, lr]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0]


@pytest.mark.parametrize("tied", [True, False])
def test_no_decay_on_norms_and_embeddings(tied):
    cfg = ModelConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=32, max_position_embeddings=8,
                      tie_word_embeddings=tied)
    model = BitNetForCausalLM(cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = parameter_groups(model)
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.embed_tokens.weight" in no_decay_names
    assert all(n.endswith("norm.weight") or n == "model.embed_tokens.weight" for n in no_decay_names)
    assert all(n.endswith("proj.weight") or n == "lm_head.weight" for n in decay_names)
    assert ("lm_head.weight" in decay_names) == (not tied)
    assert len(decay_names) + len(no_decay_names) == len(list(model.parameters()))
    opt = build_optimizer(model, 1e-3, 0.1, "cpu")
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
