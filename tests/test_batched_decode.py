"""The batched decode step (FusedDecode.batch, decode_step.cpp's decode_batch): one new token of
each of several sequences, each with its own cache, in one call. A server's batched replies are
its lone replies only if every sequence's logits are exactly those of the step alone, whatever
else is in the batch: asserted with torch.equal, on every kernel path this CPU has, for both
integer engines and every head."""

import pytest
import torch

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn.fused_decode import FusedDecode
from bitnet_cli.nn.int8 import to_int8
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.kv_cache import KVCache
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.nn.packed import to_packed

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

# Prompts of different lengths: the sequences decode at different positions, and six of them
# fill one tile of four tokens and half of another.
PROMPTS = [[3, 1, 4, 1, 5], [2, 7], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3], [1], [8, 8, 8],
           [5, 4, 3, 2, 1, 0, 1, 2]]


@pytest.fixture(scope="module")
def ops():
    ops, why = ternary_ops()
    assert ops is not None, why
    return ops


def small_model(engine: str = "float", head: str = "float16") -> BitNetForCausalLM:
    """A random ternary model whose widths leave tails past every SIMD width (72 and 168 wide,
    98 rows in the head: past whole tiles of four), with grouped-query attention."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=98, hidden_size=72, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=168, max_position_embeddings=48)
    model = BitNetForCausalLM(config).eval()
    if engine == "2bit":
        assert to_packed(model, head) is None
    elif engine == "int8":
        assert to_int8(model, head, ops=ternary_ops()[0]) is None
    return model


def prompted(model) -> list[KVCache]:
    """A cache per prompt, after its per-op pass: most grow by blocks of 4 positions as they
    decode, one was allocated for the whole context (it never grows)."""
    caches = []
    with torch.inference_mode():
        for index, prompt in enumerate(PROMPTS):
            cache = (KVCache(model.config, capacity=model.config.max_position_embeddings)
                     if index == 1 else KVCache(model.config, block=4))
            model(torch.tensor([prompt]), cache)
            caches.append(cache)
    return caches


def next_tokens(round_: int, count: int) -> list[int]:
    return [(17 * round_ + 29 * s + 5) % 98 for s in range(count)]


@pytest.mark.parametrize("engine", ["2bit", "int8"])
@pytest.mark.parametrize("head", ["float16", "float32", "int8"])
def test_each_sequence_of_a_batch_gets_its_lone_logits_to_the_bit(ops, engine, head):
    """Six sequences at different positions, decoded together for several tokens (the grown
    caches growing on the way), against each one decoded alone by decode_step: the same logits
    and the same caches, on every kernel path."""
    model = small_model(engine, head)
    for path in ops.isas():
        step = FusedDecode(model, ops, path)
        batched, alone = prompted(model), prompted(model)
        rooms = [cache.capacity for cache in batched]
        with torch.inference_mode():
            for round_ in range(6):
                tokens = next_tokens(round_, len(PROMPTS))
                logits = step.batch(tokens, batched)
                assert logits.shape == (len(PROMPTS), 98)
                for s, (token, cache) in enumerate(zip(tokens, alone)):
                    lone = step(torch.tensor([[token]]), cache).view(98)
                    assert torch.equal(logits[s], lone), (ops.path_name(path), round_, s)
        assert batched[0].capacity > rooms[0] and batched[1].capacity == rooms[1] == 48
        for mine, theirs in zip(batched, alone):
            assert mine.length == theirs.length
            for (keys, values), (lone_keys, lone_values) in zip(mine.layers, theirs.layers):
                n = mine.length
                assert torch.equal(keys[:, :, :n], lone_keys[:, :, :n])
                assert torch.equal(values[:, :, :n], lone_values[:, :, :n])


def test_a_batch_of_one_is_the_step(ops):
    model = small_model("2bit")
    step = DecodeStep(model, compile=False)
    assert step.fused
    (one,), (other,) = prompted(model)[:1], prompted(model)[:1]
    with torch.inference_mode():
        for token in (7, 11, 13):
            assert torch.equal(step.batch([token], [one])[0], step(torch.tensor([[token]]),
                                                                   other).view(98))
    assert one.length == other.length == len(PROMPTS[0]) + 3


def test_the_float_engine_batches_one_step_after_another():
    """No fused step (the float engine): DecodeStep.batch runs each sequence's own step and
    stacks the logits, each what that sequence's step gives alone."""
    model = small_model("float")
    step = DecodeStep(model, compile=False)
    assert not step.fused
    batched, alone = prompted(model), prompted(model)
    with torch.inference_mode():
        for round_ in range(3):
            tokens = next_tokens(round_, len(PROMPTS))
            logits = step.batch(tokens, batched)
            lone = torch.cat([step(torch.tensor([[t]]), c)[0] for t, c in zip(tokens, alone)])
            assert torch.equal(logits, lone)
    assert [c.length for c in batched] == [c.length for c in alone]
    with pytest.raises(ValueError, match="2 tokens for 1 caches"):
        step.batch([1, 2], batched[:1])


def test_bad_batches_are_errors_not_writes(ops):
    """A cache without room (whichever sequence's), a token outside the vocabulary, lists that
    do not match: an error before anything is written, each cache's length as it was."""
    model = small_model("2bit")
    step = DecodeStep(model, compile=False).forward
    caches = prompted(model)[:3]
    lengths = [c.length for c in caches]
    with torch.inference_mode():
        with pytest.raises(ValueError, match="3 tokens for 2 caches"):
            step.batch([1, 2, 3], caches[:2])
        with pytest.raises(ValueError, match="one cache twice"):
            step.batch([1, 2], [caches[0], caches[0]])
        for bad in (98, -1):
            with pytest.raises(RuntimeError, match="token id outside the vocabulary"):
                step.batch([1, bad, 3], caches)
        full = caches[2]  # as if its last layer had not been made room in
        layer = full.layers[1]
        layer.keys = layer.keys[:, :, :full.length].contiguous()
        layer.values = layer.values[:, :, :full.length].contiguous()
        full.ensure = lambda length: None
        with pytest.raises(RuntimeError, match=r"no room in the cache .* \(sequence 2\)"):
            step.batch([1, 2, 3], caches)
    assert [c.length for c in caches] == lengths


def test_the_op_checks_its_lists(ops):
    """decode_batch called directly: one position per token, the same number of caches for
    every sequence, caches of one sequence each."""
    model = small_model("2bit")
    step = FusedDecode(model, ops)
    caches = prompted(model)[:2]
    for cache in caches:
        cache.ensure(cache.length + 1)
    keys = [layer.keys for cache in caches for layer in cache.layers]
    values = [layer.values for cache in caches for layer in cache.layers]
    positions = [cache.length for cache in caches]

    def call(tokens, positions, keys, values):
        return ops.decode_batch(tokens, positions, *step._model(), keys, values,
                                *step._settings())

    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="one position for each token"):
            call([1, 2], positions[:1], keys, values)
        with pytest.raises(RuntimeError, match="one position for each token"):
            call([], [], [], [])
        with pytest.raises(RuntimeError, match="the same number of caches"):
            call([1, 2], positions, keys[:-1], values[:-1])
        with pytest.raises(RuntimeError, match="position past the context"):
            call([1, 2], [positions[0], 48], keys, values)
        two = KVCache(model.config, batch_size=2, capacity=8).layers[0].keys
        with pytest.raises(RuntimeError, match="caches of one sequence"):
            call([1, 2], positions, keys[:-1] + [two], values[:-1] + [two])
        assert call([1, 2], positions, keys, values).shape == (2, 98)
