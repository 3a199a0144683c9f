"""The fused decode step (nn/fused_decode.py, decode_step.cpp): a token through the whole model in
one call. Its projections are the engines' exact sums and its float work one fixed order, so the
2bit engine's logits equal the int8 engine's and the portable path's to the bit on every code
path; against the per-op path it keeps the engines' contract (tests/contract.py)."""

import pytest
import torch

from bitnet_cli.nn import kernel
from bitnet_cli.nn.decoding import DecodeStep, fused_decode
from bitnet_cli.nn.fused_decode import FusedDecode
from bitnet_cli.nn.model import KVCache, generate
from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.use.loading import load_model
from tests.contract import assert_greedy_agree, same_continuation, stepped_logits
from tests.models import SHORT_STEPS
from tests.test_int8 import PROMPTS

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)


@pytest.fixture(scope="module")
def ops():
    ops, why = kernel.ternary_ops()
    assert ops is not None, why
    return ops


@pytest.mark.parametrize("rows,k,n", [(1, 1, 1), (1, 63, 5), (1, 64, 3), (2, 65, 7),
                                      (3, 768, 40), (1, 1000, 9)])
def test_int8_head_sums_are_exact_on_every_path(ops, rows, k, n):
    generator = torch.Generator().manual_seed(k)
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
    codes[0] = 0
    x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
    x[0] = 127  # the largest sums quantized inputs make
    codes[-1] = -128
    exact = (x.long() @ codes.long().T).int()
    for path in ops.isas():
        assert torch.equal(ops.int8_mm(x, codes, path), exact), path


def fused_run(loaded, prompt, tokens, path):
    """Logits at every position after the prompt: the prompt's pass per-op, then each of
    `tokens` through the fused step on `path`."""
    step = FusedDecode(loaded.model, kernel.ternary_ops()[0], path)
    return stepped_logits(loaded.model, step, prompt, tokens)


def assert_fused_agrees(ops, two_bit, int8, prompt, tokens):
    """On every code path: the 2bit engine's fused logits equal the int8 engine's and the portable
    path's exactly (one order of float operations everywhere), and keep the engines' contract
    (tests/contract.py) with the per-op path along `tokens`."""
    with torch.inference_mode():
        per_op = two_bit.model(torch.tensor([prompt + tokens[:-1]]))[:, len(prompt) - 1:]
    portable = fused_run(two_bit, prompt, tokens, kernel.path_numbers(ops)["portable"])
    for path in ops.isas():
        fused = fused_run(two_bit, prompt, tokens, path)
        assert torch.equal(fused, fused_run(int8, prompt, tokens, path)), path
        assert torch.equal(fused, portable), path
        assert_greedy_agree(fused, per_op)


@pytest.mark.parametrize("experiment", list(PROMPTS))
def test_the_fused_step_is_the_int8_engine_to_the_bit_and_keeps_the_tokens(ops, short_run,
                                                                           experiment):
    """A 64-token greedy decode (or the context's worth) of each trained model, whose tokens are
    the float engine's: see assert_fused_agrees."""
    checkpoint = str(short_run(experiment) / "checkpoints" / step_dir_name(SHORT_STEPS))
    two_bit, int8 = load_model(checkpoint), load_model(checkpoint, engine="int8")
    float_engine = load_model(checkpoint, engine="float")
    # Trained float32 weights are not float16's: the embedding keeps its float32 table.
    assert isinstance(two_bit.model.model.embed_tokens, torch.nn.Embedding)
    context = two_bit.config.max_position_embeddings
    prompt = two_bit.tokenizer.encode(PROMPTS[experiment]).ids
    tokens = list(generate(float_engine.model, prompt, min(64, context - len(prompt))))
    assert_fused_agrees(ops, two_bit, int8, prompt, tokens)
    step = DecodeStep(two_bit.model, compile=False)
    with torch.inference_mode():
        chose = float_engine.model(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    assert step.fused
    assert same_continuation(list(generate(two_bit.model, prompt, len(tokens), step=step)), chose,
                             tokens)


@pytest.mark.parametrize("head", ["int8", "float32"])
def test_the_other_heads_through_the_fused_step(ops, short_run, head):
    """--head int8, and --head float32 (the output layer as trained: an imported float32
    model's default), through the fused step: see assert_fused_agrees."""
    checkpoint = str(short_run("tinystories") / "checkpoints" / step_dir_name(SHORT_STEPS))
    two_bit = load_model(checkpoint, head=head)
    int8 = load_model(checkpoint, engine="int8", head=head)
    if head == "float32":
        assert two_bit.model.lm_head.weight.dtype == torch.float32
    prompt = two_bit.tokenizer.encode(PROMPTS["tinystories"]).ids
    assert_fused_agrees(ops, two_bit, int8, prompt, list(generate(two_bit.model, prompt, 32)))


def test_only_the_integer_engines_on_a_cpu_are_fused(short_run):
    run = str(short_run("arithmetic"))
    assert fused_decode(load_model(run, engine="float").model) is None
    assert isinstance(fused_decode(load_model(run, engine="int8").model), FusedDecode)
    compiled = DecodeStep(load_model(run).model, compile=True)
    assert compiled.fused and compiled.settled  # fused wins over compiling: nothing to compile
