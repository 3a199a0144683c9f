"""Chat history: whole earlier turns are kept within the context, newest first."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from bitnet_cli.use import conversation as chat
from bitnet_cli.use.conversation import ChatSession, Sampling
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.data.shards import EOT
from bitnet_cli.use.loading import LoadedModel

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

WORDS = "once upon a time there was cat dog the end and then ran home".split()


def session(monkeypatch, context: int, replies: list[str], **sampling) -> tuple[ChatSession, list]:
    """A text-model session whose generate() answers with `replies` in turn and records
    (prompt ids, max_new_tokens) of each call."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate([EOT, *WORDS])},
                                           unk_token=EOT))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    config = ModelConfig(vocab_size=len(WORDS) + 1, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                         max_position_embeddings=context)
    loaded = LoadedModel(None, tokenizer, config, "tinystories", Path("ckpt"), 1)
    calls = []

    def generate(model, prompt, max_new, *args, **kwargs):
        calls.append((list(prompt), max_new))
        yield from tokenizer.encode(replies[len(calls) - 1]).ids[:max_new]
        yield tokenizer.token_to_id(EOT)

    monkeypatch.setattr(chat, "generate", generate)
    return ChatSession(loaded, Sampling(**sampling)), calls


def ids(s: ChatSession, text: str) -> list[int]:
    return s.tokenizer.encode(text).ids


def test_second_reply_is_conditioned_on_the_first_turn(monkeypatch):
    s, calls = session(monkeypatch, 64, ["there was a cat", "the end"])
    assert "".join(s.reply("once upon a time")) == "there was a cat"
    assert "".join(s.reply("and then")) == "the end"
    first, second = calls[0][0], calls[1][0]
    assert first == ids(s, "once upon a time")
    assert second == ids(s, "once upon a time there was a cat and then")
    # The reply gets what the context leaves, not a fixed --max-new-tokens (256 here).
    assert calls[1][1] == 64 - len(second)


def test_history_is_cut_at_turn_boundaries_oldest_first(monkeypatch):
    # Context 16: a reply keeps at least 4 tokens, so prompt + history get 12.
    s, calls = session(monkeypatch, 16, ["a cat", "a dog", "the end", "home"])
    for prompt in ["once upon a time", "there was", "and then ran", "the dog ran"]:
        "".join(s.reply(prompt))
    assert calls[1][0] == ids(s, "once upon a time a cat there was")  # 6 + 3 tokens fit
    assert calls[2][0] == ids(s, "there was a dog and then ran")  # 6 + 4 + 3 would not
    assert calls[3][0] == ids(s, "there was a dog and then ran the end the dog ran")  # 4 + 5 + 3
    assert all(len(p) <= 16 - 4 for p, _ in calls)


def test_reply_room_is_at_most_max_new_tokens(monkeypatch):
    s, calls = session(monkeypatch, 16, ["a cat", "a dog"], max_new_tokens=2)
    "".join(s.reply("once upon a time"))
    "".join(s.reply("there was"))
    # Reply room 2, so 16 - 2 - 2 = 12 tokens of history fit: the whole first turn (4 + 2).
    assert calls[1] == (ids(s, "once upon a time a cat there was"), 2)


def test_a_long_prompt_leaves_no_room_for_history_and_reset_forgets(monkeypatch):
    s, calls = session(monkeypatch, 16, ["a cat", "a dog", "the end"])
    "".join(s.reply("once upon a time"))
    long_prompt = "the dog ran home " * 3  # 12 tokens: no room beside a 4-token reply
    "".join(s.reply(long_prompt))
    assert calls[1] == (ids(s, long_prompt), 4)
    s.reset()
    "".join(s.reply("there was"))
    assert calls[2][0] == ids(s, "there was")


def test_streamed_text_is_the_whole_reply_decoded_without_broken_characters():
    """Byte-level BPE splits a character over tokens: the stream holds it back until it is
    whole, decodes only a short tail at each token, and adds up to the reply decoded whole."""
    from tokenizers import decoders
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = ByteLevel.alphabet()
    tokenizer = Tokenizer(models.BPE({c: i for i, c in enumerate(sorted(alphabet))}, []))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    reply = "Ünïcödé 🙂 stories, told one byte at a time: ☃ and 🐍, then plain words. " * 3
    tokens = tokenizer.encode(reply).ids
    assert len(tokens) > 3 * chat.IncrementalText.TAIL
    text = chat.IncrementalText(tokenizer)
    pieces = [text.add(token) for token in tokens]
    assert "".join(pieces) + text.rest() == tokenizer.decode(tokens) == reply
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces.count("") >= reply.count("🙂")  # each emoji's first three bytes held back


def test_each_reply_decodes_on_the_threads_the_idle_cores_allow(monkeypatch, tmp_path):
    import torch

    from bitnet_cli.use.loading import load_model
    from tests.models import random_checkpoint, story_tokenizer
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer())
    before = torch.get_num_threads()
    idle = iter([1, before])
    monkeypatch.setattr(chat, "decode_threads", lambda most: next(idle))
    try:
        s = ChatSession(load_model(str(checkpoint)), Sampling(temperature=0, max_new_tokens=4))
        "".join(s.reply("once upon a time"))
        assert s.last.threads == torch.get_num_threads() == 1  # a busy machine: one thread
        "".join(s.reply("the end"))
        assert s.last.threads == torch.get_num_threads() == before
        assert s.last.first_token_s > 0 and s.last.made >= 1
    finally:
        torch.set_num_threads(before)


def test_ctrl_c_before_the_first_token_is_reported_as_stopped(monkeypatch, tmp_path):
    from bitnet_cli.cli import app
    from tests.cli import runner
    from tests.models import random_checkpoint, story_tokenizer
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C lands in the prompt's pass
        yield

    monkeypatch.setattr(chat, "generate", interrupted)
    result = runner.invoke(app, ["chat", str(checkpoint)], input="once upon a time\n")
    assert result.exit_code == 0, result.output + result.stderr
    assert "[0 tokens, stopped before the first token]" in result.stderr
    assert "first token in" not in result.stderr and "--max-new-tokens" not in result.stderr


def test_chat_and_play_decode_in_the_precision_of_their_device(monkeypatch, tmp_path):
    """On a GPU, chat and play run in bf16 autocast as training and eval do (autocast_for);
    the device's rule is asked for with the model's own device."""
    from contextlib import contextmanager

    from bitnet_cli.use import loading
    from bitnet_cli.use.loading import load_model
    from tests.models import random_checkpoint, story_tokenizer
    entered, asked = [], []

    @contextmanager
    def marked():
        entered.append(True)
        yield

    def rule(device):
        asked.append(str(device))
        return marked

    monkeypatch.setattr(chat, "autocast_for", rule)
    monkeypatch.setattr(loading, "autocast_for", rule)
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer())
    s = ChatSession(load_model(str(checkpoint)), Sampling(temperature=0, max_new_tokens=2))
    "".join(s.reply("once upon a time"))
    assert asked == ["cpu"] and entered == [True]
    monkeypatch.setattr(loading, "load_model", lambda *a, **k: SimpleNamespace(
        experiment="tictactoe", model=None, tokenizer=ttt_tokenizer()))
    player, _ = loading.load_player("ttt", device="cpu")
    assert player.autocast is marked and asked == ["cpu", "cpu"]


def ttt_tokenizer():
    from bitnet_cli.tasks import load_experiment
    return load_experiment("tictactoe").tokenizer()


def test_piped_lines_get_replies_on_stdout_and_no_prompts(tmp_path):
    from bitnet_cli.cli import app
    from tests.cli import runner
    from tests.models import random_checkpoint
    checkpoint = random_checkpoint(tmp_path / "run", "simple")
    result = runner.invoke(app, ["chat", str(checkpoint), "--max-new-tokens", "4"],
                           input="d3=\n\na1=\n")
    assert result.exit_code == 0, result.output + result.stderr
    assert ">" not in result.stdout and result.stdout.count("\n") == 2, result.stdout
    assert result.stderr.count("first token in") == 2 and ">" not in result.stderr


def test_a_prompt_of_characters_the_model_does_not_know_says_so():
    from tokenizers import models as tokenizer_models
    tokenizer = Tokenizer(tokenizer_models.BPE(vocab={"a": 0, "b": 1, " ": 2}, merges=[]))
    config = ModelConfig(vocab_size=3, hidden_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                         max_position_embeddings=16)
    s = ChatSession(LoadedModel(None, tokenizer, config, "tinystories", Path("ckpt"), 1))
    with pytest.raises(chat.BitnetError, match=r"^none of the prompt's characters is in this "
                                               r"model's vocabulary; it knows only ' ab'$"):
        "".join(s.reply("日本"))
    with pytest.raises(chat.BitnetError, match="^the prompt is empty$"):
        "".join(s.reply(""))
