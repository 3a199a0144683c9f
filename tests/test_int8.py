"""The int8 inference path: BitLinear's maths in integers, and the same model outputs.

Tolerances, and why:
- One Int8Linear against the exact value of BitLinear's maths (integer sum / both scales,
  in float64): within 2**-23 relative, elementwise. The int32 sum is exact; the rescale rounds
  twice in float32 (the product of the scales, the division). Measured: at most 1.87 * 2**-24.
- Against BitLinear's own float32 forward: within 2e-6 of each token's largest output. That is
  the float path's error (it rounds every product and partial sum). Measured: at most 4.6e-7.
- Whole models, the int8 engine against the float engine: the engines' contract
  (tests/contract.py, the README): logits within 3% of each position's largest |logit|, greedy
  tokens the same wherever the top two are further apart than twice that. Not tighter, because
  an activation within float rounding of a quantization boundary may round either way in the two
  engines: that token's code moves one step (1/127 of its largest value) and the difference
  travels on. The float engine does the same to itself when only the batch shape changes its
  summation order, and so does any engine on another CPU. Measured on the tiny checkpoints below
  over 256 random windows each: at most 1.0%.
"""

import copy
import json

import pytest
import torch

from bitnet_cli.nn.bitlinear import (BitLinear, activation_codes, activation_quant, ternary_codes,
                                     weight_quant)
from bitnet_cli.store.checkpoint import step_dir_name
from bitnet_cli.cli import app
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.use.loading import load_model
from bitnet_cli.nn.decoding import DecodeStep
from bitnet_cli.nn import int8 as int8_module
from bitnet_cli.nn.half_head import HalfHead
from bitnet_cli.nn.int8 import (Int8Linear, Int8Part, Int8SharedInput, fbgemm_pack, fbgemm_sums,
                                fbgemm_unusable, int8_unusable, to_int8)
from bitnet_cli.nn.model import BitNetForCausalLM, generate
from tests.cli import needs_torch_compile, runner
from tests.contract import assert_greedy_agree, same_continuation, stepped_logits
from tests.models import SHORT_STEPS, random_checkpoint

pytestmark = pytest.mark.engines  # also run as other CPUs would (README, .ci/run)

PROMPTS = {"simple": "d3=", "arithmetic": "012+035=", "tictactoe": ">5",
           "tinystories": "Once upon a time", "baseline": "The dog"}


def rel_to_exact(layer: BitLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """|y - exact| / |exact| elementwise, where exact is BitLinear's maths in float64 from the
    integer codes (rows whose exact value is 0 must give exactly 0)."""
    x_codes, x_scale = activation_codes(x.reshape(-1, x.shape[-1]))
    codes, s = ternary_codes(layer.weight)
    acc = x_codes.double() @ codes.double().T
    exact = acc / (x_scale.double() * s.double())
    y = y.reshape(exact.shape).double()
    assert torch.equal(y[exact == 0], exact[exact == 0])
    return ((y - exact).abs() / exact.abs())[exact != 0]


@pytest.mark.parametrize("in_features, out_features", [(7, 5), (64, 48), (384, 1152), (1152, 384)])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 100.0])
def test_int8_linear_is_bitlinear_in_integers(in_features, out_features, magnitude):
    torch.manual_seed(0)
    layer = BitLinear(in_features, out_features)
    torch.nn.init.normal_(layer.weight, std=0.02)
    fast = Int8Linear.stacking(layer)
    # The integer codes are exactly the ones the float path quantizes to.
    assert fast.codes.dtype == torch.int8 and set(fast.codes.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(fast.codes.float() / fast.scale[:, None], weight_quant(layer.weight))
    x = torch.randn(3, 5, in_features) * magnitude
    x[0, 0] = 0.0  # an all-zero token: scale clamped, output exactly 0
    codes, scale = activation_codes(x)
    assert torch.equal(codes.to(torch.int8).float(), codes)  # whole numbers that int8 holds
    assert torch.equal(codes / scale, activation_quant(x))

    with torch.no_grad():
        y, reference = fast(x), layer(x)
    assert y.shape == reference.shape and y.dtype == torch.float32
    assert torch.equal(y[0, 0], torch.zeros(out_features))
    assert rel_to_exact(layer, x, y).max() <= 2**-23
    row_max = reference.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    assert ((y - reference).abs() / row_max).max() <= 2e-6


def test_to_int8_swaps_every_bitlinear_and_leaves_twins_alone():
    cfg = dict(vocab_size=50, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=32)
    model = BitNetForCausalLM(ModelConfig(**cfg)).eval()
    assert to_int8(model) is None
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    # q, k and v stacked into one matrix, gate and up into another: four per layer
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 2 * 4
    assert [m.splits for m in model.model.layers[0].modules() if isinstance(m, Int8Linear)] == [
        [64, 32, 32], [64], [128, 128], [64]]
    assert model.lm_head.weight.dtype == torch.float16
    assert model.model.embed_tokens.weight.dtype == torch.float32  # the input stays exact
    assert model(torch.tensor([[1, 2, 3]])).dtype == torch.float32

    twin = BitNetForCausalLM(ModelConfig(**cfg, quant="none")).eval()
    before = copy.deepcopy(twin.state_dict())
    assert "no ternary layers" in to_int8(twin)
    assert all(torch.equal(before[k], v) for k, v in twin.state_dict().items())
    assert int8_unusable(torch.device("cpu"), {(7, 5), (64, 48)}) is None
    # A device where _int_mm cannot run (here: meta, which holds no data) keeps the float model
    # and says why, as a GPU without usable int8 kernels would.
    with torch.device("meta"):
        elsewhere = BitNetForCausalLM(ModelConfig(**cfg)).eval()
    assert to_int8(elsewhere).startswith("torch._int_mm fails on meta for a ")
    assert sum(isinstance(m, BitLinear) for m in elsewhere.modules()) == 2 * 7


@pytest.mark.parametrize("few_rows", ["kernel", "fbgemm", "widened"])
def test_half_head_sums_in_float32_for_one_row_as_for_many(ternary_kernel, few_rows):
    """The float16 table's only rounding is its own: inputs, products and sums are float32
    whether one row goes through (the kernel's rows; where there is no kernel, fbgemm's float16
    GEMM, or the table widened where torch has no fbgemm) or several."""
    torch.manual_seed(0)
    weight = torch.randn(5000, 72) * 0.02
    head = HalfHead(weight, ternary_kernel if few_rows == "kernel" else None)
    if few_rows == "fbgemm":
        needs_fbgemm()
        assert head.packed is not None
    if few_rows == "widened":
        head.packed = None
    x = torch.randn(5, 72)
    stored = weight.half().double()
    exact = x.double() @ stored.T
    bound = 72 * 2**-24 * (x.double().abs() @ stored.abs().T) + 1e-30
    for got in (head(x), torch.cat([head(row[None]) for row in x]), head(x[None])[0]):
        assert got.dtype == torch.float32
        assert ((got.double() - exact).abs() <= bound).all()


@pytest.fixture(params=list(PROMPTS))
def trained(request, short_run):
    """A checkpoint of each experiment after a short run on its tiny size (local text data)."""
    experiment = request.param
    return experiment, short_run(experiment) / "checkpoints" / step_dir_name(SHORT_STEPS)


def assert_engines_agree(checkpoint, prompt: str, max_new_tokens: int = 64) -> None:
    """The int8 engine against the float engine on one checkpoint: logits on random windows
    within the tolerances above, greedy tokens identical."""
    slow = load_model(str(checkpoint), engine="float")
    fast = load_model(str(checkpoint), engine="int8")
    assert (slow.engine, fast.engine) == ("float", "int8") and fast.engine_note is None
    assert not any(isinstance(m, BitLinear) for m in fast.model.modules())

    ids = torch.randint(0, slow.config.vocab_size, (8, slow.config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = slow.model(ids)
        assert_greedy_agree(fast.model(ids), expected)
        # The same exact sums and float operations: with the head as it is, the same bits (on
        # every CPU: no activation can land on another side of a rounding boundary).
        exact_head = load_model(str(checkpoint), engine="int8", head="float32").model
        assert torch.equal(exact_head(ids), expected)

    prompt_ids = slow.tokenizer.encode(prompt).ids
    steps = min(max_new_tokens, slow.config.max_position_embeddings - len(prompt_ids))
    tokens = list(generate(slow.model, prompt_ids, steps))
    with torch.no_grad():
        chose = slow.model(torch.tensor([prompt_ids + tokens[:-1]]))[0, len(prompt_ids) - 1:]
    assert same_continuation(list(generate(fast.model, prompt_ids, steps)), chose, tokens)


def test_int8_engine_agrees_with_float_on_every_experiment(trained):
    experiment, checkpoint = trained
    assert_engines_agree(checkpoint, PROMPTS[experiment])


def test_engine_option_of_chat_and_eval(short_run, tmp_path):
    """--engine picks the engine (2bit the CPU default), each says so; eval's held-out loss
    agrees between engines as their logits do; a --quant none model says why it stays in float;
    a bad engine is one clear line."""
    run = str(short_run("simple"))
    for engine, flags in (("2bit", []), ("int8", ["--engine", "int8"]), ("float", ["--engine", "float"])):
        result = runner.invoke(app, ["chat", run, "--prompt", "d3=", "--temperature", "0", *flags])
        assert result.exit_code == 0, result.stderr
        assert f", {engine} engine" in result.stderr.splitlines()[-1]

    reports = {}
    for engine in ("int8", "float"):
        result = runner.invoke(app, ["eval", run, "--json", "--engine", engine])
        assert result.exit_code == 0, result.stderr
        reports[engine] = json.loads(result.stdout)
    assert reports["int8"]["engine"] == "int8" and reports["float"]["engine"] == "float"
    assert reports["int8"]["params"] == reports["float"]["params"]
    assert reports["int8"]["metrics"]["loss"] == pytest.approx(reports["float"]["metrics"]["loss"],
                                                               rel=1e-2)

    twin = random_checkpoint(tmp_path / "twin", quant="none")
    result = runner.invoke(app, ["chat", str(twin), "--prompt", "d3=", "--temperature", "0"])
    assert result.exit_code == 0
    assert "int8 engine not used: it has no ternary layers (trained with --quant none)" in result.stderr
    result = runner.invoke(app, ["eval", run, "--engine", "fp4"])
    assert result.exit_code == 1
    assert result.stderr == "error: --engine must be one of 2bit, int8, float, got 'fp4'\n"


# The int8 head rounds its input to 8 bits and each row to int8: its own bound, wider than the
# float engines' (measured on the tiny checkpoints: at most 1.2%; the float engines 0.8%).
INT8_HEAD_BOUND = 0.05


def test_int8_head_keeps_the_contract_with_its_own_bound(trained):
    """--head int8 (the output layer as int8, one scale per row, its input rounded to 8 bits)
    keeps the engines' contract with the float16 head, at its own bound: on random windows of
    every trained checkpoint, and along a greedy continuation. It is not the default: where
    logits are nearly flat (a barely trained model), the wider bound decides fewer tokens."""
    experiment, checkpoint = trained
    half = load_model(str(checkpoint))
    quarter = load_model(str(checkpoint), head="int8")
    assert isinstance(quarter.model.lm_head, Int8Linear) and quarter.model.lm_head.codes.dtype == torch.int8
    ids = torch.randint(0, half.config.vocab_size, (8, half.config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_greedy_agree(quarter.model(ids), half.model(ids), INT8_HEAD_BOUND)
    prompt_ids = half.tokenizer.encode(PROMPTS[experiment]).ids
    steps = min(64, half.config.max_position_embeddings - len(prompt_ids))
    tokens = list(generate(half.model, prompt_ids, steps))
    with torch.no_grad():
        chose = half.model(torch.tensor([prompt_ids + tokens[:-1]]))[0, len(prompt_ids) - 1:]
    assert same_continuation(list(generate(quarter.model, prompt_ids, steps)), chose, tokens,
                             INT8_HEAD_BOUND)


def test_stacked_layers_give_each_layers_own_output_exactly():
    """q, k and v as one int8 matrix: each part is bit for bit what its layer alone gives, as
    is each part called on its own."""
    torch.manual_seed(0)
    layers = [BitLinear(64, n) for n in (64, 32, 32)]
    for layer in layers:
        torch.nn.init.normal_(layer.weight, std=0.02)
    whole = Int8Linear.stacking(*layers)
    x = torch.randn(2, 5, 64)
    alone = [Int8Linear.stacking(layer)(x) for layer in layers]
    with torch.no_grad():
        for part, own in zip(whole.parts(x), alone):
            assert torch.equal(part, own)
        for index, own in enumerate(alone):
            assert torch.equal(Int8Part(whole, index)(x), own)


def test_the_engine_swaps_each_shared_input_group_whole():
    """to_int8 replaces the model's declared SharedInput groups (q, k, v; gate, up) by one
    stacked matrix each, found by type rather than by layer names; a layer called alone gives
    its own rows."""
    torch.manual_seed(0)
    model = BitNetForCausalLM(ModelConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=96, max_position_embeddings=16)).eval()
    x = torch.randn(1, 3, 64)
    with torch.no_grad():
        before = [layer(x) for layer in model.model.layers[0].self_attn.qkv.layers]
        assert to_int8(model) is None
        attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert isinstance(attention.qkv, Int8SharedInput) and isinstance(mlp.gate_up, Int8SharedInput)
        assert attention.qkv.whole.splits == [64, 32, 32] and mlp.gate_up.whole.splits == [96, 96]
        assert isinstance(attention.o_proj, Int8Linear) and isinstance(mlp.down_proj, Int8Linear)
        for got, layer, want in zip(attention.qkv(x), (attention.q_proj, attention.k_proj,
                                                       attention.v_proj), before):
            assert torch.equal(got, layer(x))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_decode_step_keeps_the_engines_contract(tmp_path):
    """chat --compile decodes the per-op path through a compiled one-token step: inductor sums in
    its own order, so it keeps the engines' contract with the eager step along the same tokens;
    where compiling fails, one line and eager decoding, the eager floats exactly."""
    from tests.models import random_checkpoint, story_tokenizer
    needs_torch_compile()
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer(),
                                   max_position_embeddings=48)
    loaded = load_model(str(checkpoint))
    prompt = list(range(1, 9))
    eager = list(generate(loaded.model, prompt, 32))
    eager_logits = stepped_logits(loaded.model, loaded.model, prompt, eager)
    step = DecodeStep(loaded.model, compile=True, fused=False)
    step.warm_up()
    assert step.forward is not loaded.model
    assert_greedy_agree(stepped_logits(loaded.model, step, prompt, eager), eager_logits)

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")
    notes = []
    failing = DecodeStep(loaded.model, compile=True, notice=notes.append, fused=False)
    failing.forward = broken
    assert torch.equal(stepped_logits(loaded.model, failing, prompt, eager), eager_logits)
    assert notes == ["torch.compile failed (RuntimeError: inductor exploded); decoding eagerly"]


def saturating_int_mm(a, b):
    """torch._int_mm as oneDNN computes it with AVX2 or SSE4.1 only: a made unsigned (+128),
    each pair of products summed to int16 with saturation, 128 * sum(b) taken off again."""
    u = (a.long() + 128).reshape(a.shape[0], -1, 2)
    w = b.t().long().reshape(b.shape[1], -1, 2)
    pairs = (u[:, None] * w[None]).sum(-1).clamp(-32768, 32767)
    return (pairs.sum(-1) - 128 * b.long().sum(0)).int()


def test_the_int8_heads_sums_are_exact_where_int_mm_saturates(ternary_kernel, monkeypatch):
    """Full-range int8 head codes overflow the int16 pairs of oneDNN's AVX2 kernel (ternary
    codes never do): the int8 head sums through the kernel's int8_mm, and without the kernel
    --head int8 is refused with the reason rather than computed wrong."""
    from bitnet_cli.nn import int8 as int8_module
    monkeypatch.setattr(int8_module, "int_mm", saturating_int_mm)
    torch.manual_seed(0)
    cfg = dict(vocab_size=40, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=96, max_position_embeddings=16)
    weight = torch.randn(40, 64)
    x = torch.randn(3, 64)
    codes, scale = activation_codes(x)
    exact = codes.double() @ Int8Linear.per_row(weight).codes.double().T
    assert not torch.equal(saturating_int_mm(codes.to(torch.int8),
                                             Int8Linear.per_row(weight).codes.t()).double(), exact)
    head = Int8Linear.per_row(weight, ternary_kernel)
    assert torch.equal(head(x), exact.float() / (scale * head.scale))
    model = BitNetForCausalLM(ModelConfig(**cfg)).eval()
    assert to_int8(model, "int8").startswith("--head int8 needs exact int8 sums, and torch._int_mm "
                                             "gives wrong results on cpu")
    assert to_int8(BitNetForCausalLM(ModelConfig(**cfg)).eval(), "int8", ops=ternary_kernel) is None


def needs_fbgemm() -> None:
    """Skip where this torch has no fbgemm (an ARM build): the int8 engine sums with _int_mm."""
    try:
        fbgemm_pack(torch.zeros(1, 1, dtype=torch.int8))
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        pytest.skip(f"no fbgemm in this torch ({type(e).__name__})")


@pytest.mark.parametrize("in_features, out_features", [(1, 1), (7, 5), (33, 17), (768, 130),
                                                       (1001, 333), (3071, 96), (5003, 41)])
def test_fbgemm_sums_are_the_exact_integer_sums(in_features, out_features):
    """Without the 2-bit kernel the ternary layers sum in fbgemm (Int8Linear.keep_in_fbgemm):
    its float32 sums are the exact integers, on odd shapes, at the extremes (codes of +-127
    against rows of all +1 and all -1: the largest sums of either sign) and for one row as for
    several; so a layer's outputs are _int_mm's bit for bit."""
    needs_fbgemm()
    generator = torch.Generator().manual_seed(in_features)
    codes = torch.randint(-127, 128, (6, in_features), generator=generator).float()
    codes[0], codes[1], codes[2, ::2] = 127, -127, -127
    rows = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, generator=generator)
    rows[0] = 1
    rows[-1] = -1
    packed = fbgemm_pack(rows)
    for tokens in (codes[:1], codes[1:2], codes):
        got = fbgemm_sums(tokens, packed)
        assert got.dtype == torch.float32
        assert torch.equal(got.double(), (tokens.long() @ rows.long().T).double())

    layer = BitLinear(in_features, out_features)
    torch.nn.init.normal_(layer.weight, std=0.02)
    x = torch.randn(2, 3, in_features, generator=generator)
    in_int8, in_fbgemm = Int8Linear.stacking(layer), Int8Linear.stacking(layer)
    in_fbgemm.keep_in_fbgemm()
    assert in_fbgemm.codes is None and in_fbgemm.fbgemm_codes is not None
    with torch.no_grad():
        for tokens in (x, x[:1, :1]):
            assert torch.equal(in_fbgemm(tokens), in_int8(tokens))


def fbgemm_off(monkeypatch) -> None:
    """to_int8 as it was before fbgemm: the projections' codes in int8 tensors, summed by
    torch._int_mm."""
    monkeypatch.setattr(int8_module, "fbgemm_unusable", lambda shapes: "off")


def test_fbgemm_engine_gives_the_int_mm_engines_logits_bit_for_bit(monkeypatch):
    """A model converted without the kernel keeps its codes in fbgemm's layout, and its logits
    are exactly those of the same model summed by torch._int_mm: over many positions at once
    and decoding one token at a time (the head is the same float16 head in both)."""
    needs_fbgemm()
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=70, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=200, max_position_embeddings=40)
    fast = BitNetForCausalLM(config).eval()
    reference = copy.deepcopy(fast)
    assert to_int8(fast) is None
    with monkeypatch.context() as patch:
        fbgemm_off(patch)
        assert to_int8(reference) is None
    layers = {name: [m for m in model.modules() if isinstance(m, Int8Linear)]
              for name, model in (("fast", fast), ("reference", reference))}
    assert len(layers["fast"]) == len(layers["reference"]) == 2 * 4
    assert all(m.codes is None and m.fbgemm_codes is not None for m in layers["fast"])
    assert all(m.codes is not None and m.fbgemm_codes is None for m in layers["reference"])

    ids = torch.randint(0, config.vocab_size, (3, config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fast(ids), reference(ids))
    prompt = [5, 9, 2]
    tokens = list(generate(reference, prompt, 30))
    step = lambda model: lambda ids, cache: model(ids, cache, last_only=True)  # noqa: E731
    assert torch.equal(stepped_logits(fast, step(fast), prompt, tokens),
                       stepped_logits(reference, step(reference), prompt, tokens))
    assert list(generate(fast, prompt, 30)) == tokens


def test_without_fbgemm_the_int8_engine_sums_with_int_mm(monkeypatch):
    """A torch without fbgemm's ops (an older or ARM build, or one that has dropped quantized
    tensors), or fbgemm sums that fail the one-time check: the engine keeps its int8 codes for
    torch._int_mm, and the float16 head widens its table; the outputs are the int8 engine's."""
    cfg = dict(vocab_size=50, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=128, max_position_embeddings=16)
    torch.manual_seed(0)
    original = BitNetForCausalLM(ModelConfig(**cfg)).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))

    def converted() -> BitNetForCausalLM:
        model = copy.deepcopy(original)
        assert to_int8(model) is None
        return model

    with monkeypatch.context() as patch:
        fbgemm_off(patch)
        with torch.no_grad():
            expected = converted()(ids)
    with monkeypatch.context() as patch:
        patch.setattr(torch.ops, "quantized", object())  # none of its ops
        assert fbgemm_unusable({(64, 32)}) == (
            "fbgemm's int8 GEMM fails on cpu for a 64x32 layer "
            "('object' object has no attribute 'linear_prepack')")
        missing = converted()
        assert missing.lm_head.packed is None
    with monkeypatch.context() as patch:
        patch.setattr(int8_module, "fbgemm_sums", lambda x_codes, packed: x_codes[:, :1] + 0.5)
        assert fbgemm_unusable({(64, 32)}) == ("fbgemm's int8 GEMM gives wrong results on cpu for "
                                               "a 64x32 layer")
        wrong = converted()
    for model in (missing, wrong):
        layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert layers and all(m.fbgemm_codes is None and m.codes.dtype == torch.int8
                              for m in layers)
        with torch.no_grad():
            assert torch.equal(model(ids), expected)
