import re

import numpy as np
import pytest
import torch

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks import load_experiment
from bitnet_cli.tasks.arithmetic import (ArithmeticTask, format_answer, format_prompt,
                                               parse_answer, solve)
from bitnet_cli.tasks.problems import IGNORE
from bitnet_cli.tasks.rows import DeviceBatches
from bitnet_cli.nn.model import BitNetForCausalLM


def test_arithmetic_format():
    assert format_prompt(12, "+", 35) + format_answer(solve(12, "+", 35)) == "012+035=74;"
    assert format_answer(solve(3, "-", 100)) == "-79;"
    assert format_answer(solve(100, "*", 100)) == "00001;"
    assert solve(7, "/", 2) == 3 and solve(0, "/", 9) == 0
    for value in [0, 5, 10, 47, -97, 10000, -1]:
        assert parse_answer(format_answer(value)) == value
    assert parse_answer("x;") is None


@pytest.mark.parametrize("typed, prompt", [("12+35=", "012+035="), (" 100 // 7 ", "100/007="),
                                           ("100/7=", "100/007="), ("0*100", "000*100=")])
def test_chat_reads_problems_as_a_person_writes_them(typed, prompt):
    assert ArithmeticTask().chat_prompt(typed) == prompt


@pytest.mark.parametrize("typed, message", [
    ("100-0=", "outside what the model was trained on (a from 0 to 100, b from 1 to 100"),
    ("101+5=", "outside what the model was trained on"),
    ("9" * 5000 + "+1=", "is not a problem like 12+35="),  # no int() of 5000 digits
    ("12^2=", "is not a problem like 12+35= (a from 0 to 100, b from 1 to 100, one of + - * //"),
])
def test_chat_refuses_what_the_model_never_saw(typed, message):
    with pytest.raises(BitnetError, match=re.escape(message)):
        ArithmeticTask().chat_prompt(typed)


def test_arithmetic_heldout_is_never_trained_on():
    task = ArithmeticTask()
    heldout = {prompt for prompt, _, _ in task.heldout()}
    assert len(heldout) == 4000
    assert {g for _, _, g in task.heldout()} == set("+-*/")
    rng = np.random.default_rng(0)
    seen = {prompt for prompt, _, _ in task.sample(rng, 50_000)}
    assert not seen & heldout
    assert len(seen) > 15_000  # the rest of the problem space is sampled broadly
    a_values = {int(p[:3]) for p in seen}
    b_values = {int(p[4:7]) for p in seen}
    assert a_values == set(range(0, 101)) and b_values == set(range(1, 101))


def test_the_vocabulary_covers_every_character():
    for name in ["simple", "arithmetic"]:
        task = load_experiment(name)
        tok = task.tokenizer()
        for prompt, answer, _ in task.heldout()[:50] + task.sample(np.random.default_rng(1), 50):
            text = prompt + answer
            ids = tok.encode(text).ids
            assert tok.token_to_id("<unk>") not in ids
            assert ids == task.encode(text) and tok.decode(ids) == text


@pytest.mark.parametrize("name", ["simple", "arithmetic"])
def test_stream_is_reproducible_and_resumable(name):
    task = load_experiment(name)
    a = task.stream(seed=3, batch_size=4, seq_len=32)
    a.next_batch()
    state = a.state_dict()
    expected = a.next_batch()
    b = task.stream(seed=99, batch_size=4, seq_len=32)
    b.load_state_dict(state)
    got = b.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])
    inputs, labels = expected
    assert inputs.shape == labels.shape == (4, 32)
    # Labels are the next token where it belongs to an answer, and ignored elsewhere.
    answer = labels != IGNORE
    assert 0 < answer.float().mean() < 1
    assert torch.equal(labels[:, :-1][answer[:, :-1]], inputs[:, 1:][answer[:, :-1]])


def test_a_batch_made_ahead_is_not_counted_in_the_position():
    task = load_experiment("tictactoe")
    batches = DeviceBatches(task.stream(seed=3, batch_size=4, seq_len=10), torch.device("cpu"))
    batches.next_batch()
    batches.prefetch()  # made ahead, not handed out yet
    state = batches.state_dict()
    expected = batches.next_batch()
    resumed = DeviceBatches(task.stream(seed=99, batch_size=4, seq_len=10), torch.device("cpu"))
    resumed.load_state_dict(state)
    got = resumed.next_batch()
    assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def greedy_answers(model, task, problems):
    end = task.char_ids[task.answer_end]
    correct = []
    for prompt, answer, _ in problems:
        ids = task.encode(prompt)
        for _ in range(len(answer) + 2):
            next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(next_id)
            if next_id == end:
                break
        correct.append(ids[len(prompt):] == task.encode(answer))
    return correct


def test_teacher_forced_exact_match_equals_greedy_decoding():
    torch.manual_seed(0)
    task = load_experiment("simple")
    cfg = ModelConfig(vocab_size=task.tokenizer().get_vocab_size(), hidden_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, max_position_embeddings=32)
    model = BitNetForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = task.stream(seed=0, batch_size=32, seq_len=32)
    for _ in range(120):  # enough for some answers to be right and others wrong
        x, y = stream.next_batch()
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(),
                                                 ignore_index=IGNORE)
        loss.backward()
        opt.step()
        opt.zero_grad()
    metrics = task.evaluate(model, "cpu")
    greedy = greedy_answers(model, task, task.heldout())
    assert metrics["acc"] == pytest.approx(sum(greedy) / len(greedy))
    assert 0 < metrics["acc"] < 1, "the check needs both right and wrong answers"


def test_preset_vocab_sizes_match_the_tokenizers():
    """`bitnet cost` reads PRESETS' vocab sizes without importing the experiments (torch)."""
    from bitnet_cli.config.presets import PRESETS
    for name, preset in PRESETS.items():
        task = load_experiment(name)
        if hasattr(task, "prepare"):
            continue  # a text experiment's BPE is trained on the data, to --vocab-size
        assert preset.vocab_size == task.tokenizer().get_vocab_size(), name
