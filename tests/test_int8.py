"""The int8 inference path: BitLinear's maths in integers, and the same model outputs.

Tolerances, and why:
- One Int8Linear against the exact value of BitLinear's maths (integer sum / both scales,
  in float64): within 2**-23 relative, elementwise. The int32 sum is exact; the rescale rounds
  twice in float32 (the product of the scales, the division). Measured: at most 1.87 * 2**-24.
- Against BitLinear's own float32 forward: within 2e-6 of each token's largest output. That is
  the float path's error (it rounds every product and partial sum). Measured: at most 4.6e-7.
- Whole trained models, the int8 engine (float16 head) against the float engine (float32):
  logits within 3% of the largest |logit| at worst and 0.05% on average, the same greedy
  tokens, and the same top choice at 99% of positions. Not tighter, because an activation
  within float rounding of a quantization boundary may round either way in the two engines: that
  token's code moves one step (1/127 of its largest value) and the difference travels on. The
  float engine does the same to itself when only the batch shape changes its summation order.
  Measured on the tiny checkpoints below over 256 random windows each: at most 1.0%, mean at
  most 0.006%, top choice the same at 99.6% (tinystories, 2 threads: a 30-step model has many
  near-ties) to 99.99% or more; with a float32 head instead of float16
  the worst case is unchanged (the head is not what makes it).
- Greedy generation from each experiment's prompt: token-identical.
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
from bitnet_cli.nn.int8 import (HalfHead, Int8Linear, Int8Part, Int8SharedInput, int8_unusable,
                                to_int8)
from bitnet_cli.nn.model import BitNetForCausalLM, generate
from bitnet_cli.tasks.tictactoe import ModelPlayer, play_matches
from tests.cli import runner
from tests.models import SHORT_STEPS

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


def test_half_head_rounds_only_where_float16_must():
    """Several rows: the float16 weights widened, so only their own rounding remains. One row
    (decoding): input and output are float16 too, each rounded by at most 2**-11 relative."""
    torch.manual_seed(0)
    weight = torch.randn(1000, 64) * 0.02
    head = HalfHead(weight)
    x = torch.randn(5, 64)
    stored = weight.half().double()
    exact = x.double() @ stored.T
    torch.testing.assert_close(head(x).double(), exact, rtol=1e-6, atol=1e-7)
    one = torch.cat([head(row[None]) for row in x]).double()
    bound = 2**-10 * (x.double().abs() @ stored.abs().T) + 1e-7
    assert ((one - exact).abs() <= bound).all()
    assert head(x).dtype == torch.float32 and head(x[:1]).dtype == torch.float32


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
        reference, logits = slow.model(ids), fast.model(ids)
    scale = reference.abs().max()
    diff = (logits - reference).abs() / scale
    assert diff.max() <= 3e-2 and diff.mean() <= 5e-4, (diff.max(), diff.mean())
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.99

    prompt_ids = slow.tokenizer.encode(prompt).ids
    steps = min(max_new_tokens, slow.config.max_position_embeddings - len(prompt_ids))
    assert list(generate(fast.model, prompt_ids, steps)) == list(generate(slow.model, prompt_ids, steps))


def test_int8_engine_agrees_with_float_on_every_experiment(trained):
    experiment, checkpoint = trained
    assert_engines_agree(checkpoint, PROMPTS[experiment])


def test_engine_option_of_chat_and_eval(tmp_path, monkeypatch):
    """--engine picks the engine; int8 is the CPU default; a --quant none model says why it
    stays in float; a bad engine is one clear line."""
    monkeypatch.setenv("BITNET_HOME", str(tmp_path))
    for name, quant in (("ternary", "ternary"), ("twin", "none")):
        result = runner.invoke(app, ["train", "simple", "--steps", "20", "--eval-every", "20",
                                     "--no-compile", "--quant", quant, "--name", name])
        assert result.exit_code == 0, result.stderr
    replies = {}
    for engine in ([], ["--engine", "int8"], ["--engine", "float"]):
        result = runner.invoke(app, ["chat", "ternary", "--prompt", "d3=", "--temperature", "0",
                                     *engine])
        assert result.exit_code == 0, result.stderr
        replies[tuple(engine)] = result.stdout
    assert len(set(replies.values())) == 1

    reports = {}
    for engine in ("int8", "float"):
        result = runner.invoke(app, ["eval", "ternary", "--json", "--engine", engine])
        assert result.exit_code == 0, result.stderr
        reports[engine] = json.loads(result.stdout)
    assert reports["int8"]["engine"] == "int8" and reports["float"]["engine"] == "float"
    assert reports["int8"]["params"] == reports["float"]["params"]
    assert reports["int8"]["metrics"]["acc"] == reports["float"]["metrics"]["acc"]
    assert reports["int8"]["metrics"]["loss"] == pytest.approx(reports["float"]["metrics"]["loss"],
                                                               rel=1e-3)

    result = runner.invoke(app, ["chat", "twin", "--prompt", "d3=", "--temperature", "0"])
    assert result.exit_code == 0
    assert "int8 engine not used: it has no ternary layers (trained with --quant none)" in result.stderr
    result = runner.invoke(app, ["eval", "ternary", "--engine", "fp4"])
    assert result.exit_code == 1
    assert result.stderr == "error: --engine must be one of 2bit, int8, float, got 'fp4'\n"


class RecordingPlayer(ModelPlayer):
    """A model player that keeps every move it chose."""
    moves: list

    def choose(self, games):
        chosen = super().choose(games)
        self.moves = getattr(self, "moves", []) + [chosen]
        return chosen


def test_int8_head_keeps_the_float16_heads_greedy_tokens(trained):
    """--head int8 (the output layer as int8, one scale per row, its input rounded to 8 bits) is
    offered because its greedy tokens are the float16 head's on every trained checkpoint (for
    tic-tac-toe, its moves: the opponent's turns are never trained, so a free-running greedy
    continuation there reads untrained, nearly tied logits). It is not the default: on random
    windows its top choice is the float16 head's at 99.6-100% of positions, but at 94.9% on the
    30-step baseline model, whose 512 logits are nearly flat (measured; the floor below leaves
    room for other CPUs)."""
    experiment, checkpoint = trained
    half = load_model(str(checkpoint))
    quarter = load_model(str(checkpoint), head="int8")
    assert isinstance(quarter.model.lm_head, Int8Linear) and quarter.model.lm_head.codes.dtype == torch.int8
    ids = torch.randint(0, half.config.vocab_size, (8, half.config.max_position_embeddings),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, logits = half.model(ids), quarter.model(ids)
    agree = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    if experiment == "tictactoe":  # every game eval plays, move for move
        players = [RecordingPlayer(loaded.model, loaded.tokenizer) for loaded in (quarter, half)]
        for player in players:
            play_matches(player, 20, 0)
        assert players[0].moves == players[1].moves
    else:
        prompt_ids = half.tokenizer.encode(PROMPTS[experiment]).ids
        steps = min(64, half.config.max_position_embeddings - len(prompt_ids))
        assert list(generate(quarter.model, prompt_ids, steps)) == list(generate(half.model, prompt_ids, steps))
    assert agree >= (0.92 if experiment == "baseline" else 0.99)


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


def test_compiled_decode_step_keeps_the_greedy_tokens(tmp_path):
    """chat --compile decodes the per-op path through a compiled one-token step: the same
    greedy tokens as the eager engine; where compiling fails, one line and eager decoding, the
    same tokens."""
    from tests.models import random_checkpoint, story_tokenizer
    checkpoint = random_checkpoint(tmp_path / "run", "tinystories", story_tokenizer(),
                                   max_position_embeddings=48)
    loaded = load_model(str(checkpoint))
    prompt = list(range(1, 9))
    eager = list(generate(loaded.model, prompt, 32))
    step = DecodeStep(loaded.model, compile=True, fused=False)
    step.warm_up()
    assert step.forward is not loaded.model
    assert list(generate(loaded.model, prompt, 32, step=step)) == eager

    def broken(*args, **kwargs):
        raise RuntimeError("inductor exploded\nsecond line")
    notes = []
    failing = DecodeStep(loaded.model, compile=True, notice=notes.append, fused=False)
    failing.forward = broken
    assert list(generate(loaded.model, prompt, 32, step=failing)) == eager
    assert notes == ["torch.compile failed (RuntimeError: inductor exploded); decoding eagerly"]
