"""The KV cache grows with the tokens (nn/kv_cache.py) and gives the logits of a cache
preallocated to the whole context, to the bit: on the per-op path, the fused step, a compiled
step and a conversation, across many growths (blocks of 4 positions here, 256 in use)."""

import pytest
import torch

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn import model as model_module
from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn.kv_cache import KVCache, grown_capacity
from bitnet_cli.nn.model import BitNetForCausalLM, generate
from bitnet_cli.nn.packed import to_packed
from tests.cli import needs_torch_compile

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

BLOCK = 4


def small_model(context: int = 64, packed: bool = False) -> BitNetForCausalLM:
    """A random ternary model (grouped-query attention: 4 heads share 2 K/V heads)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=160,
                         max_position_embeddings=context)
    model = BitNetForCausalLM(config).eval()
    if packed:
        assert to_packed(model) is None  # the 2bit engine: decoding takes the fused step
    return model


def decoded_logits(model, step, cache, prompt, tokens) -> torch.Tensor:
    """The prompt's pass per-op, then each of `tokens` through `step(ids, cache)`."""
    with torch.inference_mode():
        logits = [model(torch.tensor(prompt), cache, last_only=True)]
        for token in tokens:
            logits.append(step(torch.tensor([[token]] * len(prompt)), cache))
    return torch.cat(logits, dim=1)


def preallocated(model, batch_size=1) -> KVCache:
    """The cache as it was before it grew: the whole context, allocated up front."""
    context = model.config.max_position_embeddings
    return KVCache(model.config, batch_size, capacity=context)


def test_capacity_grows_by_blocks_then_doubles_up_to_the_context():
    assert grown_capacity(1, 0, 256, 32768) == 256
    assert grown_capacity(256, 0, 256, 32768) == 512  # one position to spare
    assert grown_capacity(300, 0, 256, 32768) == 512  # a long prompt: rounded up to blocks
    assert grown_capacity(257, 256, 256, 32768) == 512
    assert grown_capacity(513, 512, 256, 32768) == 1024
    assert grown_capacity(20000, 16384, 256, 32768) == 32768
    assert grown_capacity(30, 16, 256, 40) == 40  # never past the context
    with pytest.raises(ValueError, match="longer than the model's context"):
        grown_capacity(41, 40, 256, 40)
    model = small_model()
    cache = KVCache(model.config, block=BLOCK)
    assert cache.capacity == 0 and cache.length == 0
    seen = []
    for length in range(1, 65):
        cache.ensure(length)
        seen.append(cache.capacity)
    assert sorted(set(seen)) == [4, 8, 16, 32, 64]
    assert preallocated(model).capacity == 64
    with pytest.raises(ValueError):
        KVCache(model.config, capacity=65)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_the_per_op_path_gives_the_preallocated_caches_logits(batch_size):
    """The float engine: a prompt, then tokens one at a time, then a chunk of several at once
    (the masked attention of a continued sequence), across every growth to the context."""
    model = small_model()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (batch_size, 64), generator=generator)

    def run(cache):
        with torch.inference_mode():
            parts = [model(ids[:, :5], cache)]
            parts += [model(ids[:, t:t + 1], cache) for t in range(5, 40)]
            parts.append(model(ids[:, 40:51], cache))  # 40 -> 51 crosses 48's room
            parts += [model(ids[:, t:t + 1], cache) for t in range(51, 64)]
        return torch.cat(parts, dim=1)

    growing = KVCache(model.config, batch_size, block=BLOCK)
    assert torch.equal(run(growing), run(preallocated(model, batch_size)))
    assert growing.capacity == 64 and growing.length == 64


def test_the_fused_step_gives_the_preallocated_caches_logits():
    """The 2bit engine's fused step (decode_step.cpp writes each position in place): the same
    logits as the preallocated cache's, with the cache grown before every write."""
    model = small_model(packed=True)
    step = DecodeStep(model, compile=False)
    assert step.fused
    tokens = torch.randint(0, 96, (58,), generator=torch.Generator().manual_seed(2)).tolist()
    prompt = [[3, 1, 4, 1, 5]]
    growing = KVCache(model.config, block=BLOCK)
    logits = decoded_logits(model, step, growing, prompt, tokens)
    assert torch.equal(logits, decoded_logits(model, step, preallocated(model), prompt, tokens))
    assert growing.capacity == 64 and growing.length == 63


def test_the_fused_step_refuses_a_cache_without_room():
    """A cache that was not made room in is an error from the C++, not a write past its end:
    whichever layer lacks the room."""
    model = small_model(packed=True)
    step = DecodeStep(model, compile=False).forward
    cache = KVCache(model.config, capacity=4)
    cache.length = 4  # as if 4 tokens had filled it
    cache.ensure = lambda length: None  # as if the step forgot to make room
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="no room in the cache"):
            step(torch.tensor([[5]]), cache)
        cache.layers[0].grow(8)  # the first layer has room, the second not
        with pytest.raises(RuntimeError, match="no room in the cache"):
            step(torch.tensor([[5]]), cache)
    assert cache.length == 4


@pytest.mark.slow  # a compile: 9 s of the default suite's 5 minutes
def test_a_compiled_step_gives_the_preallocated_caches_logits():
    """`chat --compile`: room is made outside the compiled forward, whose one dynamic graph
    serves every capacity."""
    needs_torch_compile()
    model = small_model(context=32)
    step = DecodeStep(model, compile=True)
    assert not step.fused and step.forward is not model
    tokens = list(range(20, 40))
    growing = KVCache(model.config, block=BLOCK)
    logits = decoded_logits(model, step, growing, [[3, 1, 4]], tokens)
    assert torch.equal(logits, decoded_logits(model, step, preallocated(model), [[3, 1, 4]],
                                              tokens))
    assert growing.capacity == 32 and growing.length == 23


@pytest.mark.parametrize("engine", ["2bit", "float"])
def test_a_conversation_gives_the_preallocated_caches_logits(monkeypatch, tmp_path, engine):
    """Several sampled turns of a chat, each a new cache for the history and the reply: every
    logit its sampling saw is the preallocated cache's."""
    from bitnet_cli.use.conversation import ChatSession, Sampling
    from bitnet_cli.use.loading import load_model
    from tests.models import random_checkpoint, story_tokenizer
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer(),
                                   max_position_embeddings=128)
    loaded = load_model(str(checkpoint), engine=engine)
    seen = []
    sample_next = model_module.sample_next
    monkeypatch.setattr(model_module, "sample_next",
                        lambda logits, *args: seen.append(logits.clone()) or sample_next(logits,
                                                                                          *args))

    def conversation() -> list[torch.Tensor]:
        seen.clear()
        session = ChatSession(loaded, Sampling(temperature=1.0, max_new_tokens=24), seed=0)
        for text in ["once upon a time", "the dog ran home", "and then"]:
            "".join(session.reply(text))
        return list(seen)

    monkeypatch.setattr(KVCache, "BLOCK", BLOCK)
    growing = conversation()
    monkeypatch.setattr(model_module, "KVCache", lambda config, device=None: KVCache(
        config, device=device, capacity=config.max_position_embeddings))
    assert len(growing) > 24
    assert all(torch.equal(a, b) for a, b in zip(growing, conversation(), strict=True))


def test_a_32k_context_holds_the_reply_not_the_context():
    """100 tokens said by a model that could read 32,768: the cache has room for 256."""
    model = small_model(context=32768, packed=True)
    inner, caches = DecodeStep(model, compile=False), []

    def step(ids, cache):
        caches.append(cache)
        return inner(ids, cache)

    assert len(list(generate(model, [3, 1, 4, 1, 5], 100, step=step))) == 100
    cache = caches[-1]
    assert cache.length == 5 + 100 and cache.capacity == 256
    assert all(k.shape[2] == v.shape[2] == 256 for k, v in cache.layers)
