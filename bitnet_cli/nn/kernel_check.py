"""The kernel's self-check: every entry point the engines use, on one code path, before any model
uses it (kernel.py runs it on each path this CPU has and keeps the fastest that passes).

What is checked, and against what:
- the ternary sums (ternary_mm) and the int8 head's (int8_mm): exact, against int64 products;
- a whole BitLinear (ternary_linear): bit for bit, the int8 engine's per-op floats;
- the float16 head for a few rows (half_linear): float32 sums, against float64;
- the fused decode step (decode_step) with each head (float16, float32, int8) and both kinds of
  weights (2-bit packed, int8): 2-bit and int8 bit for bit alike, the same bits as the portable
  path's, and the per-op model's logits within the engines' bound (int8.LOGIT_BOUND);
- the batched step (decode_batch): five sequences at different positions decoded together, each
  one's logits those of its lone step, bit for bit.
Odd shapes throughout (rows past whole tiles, a hidden size with a tail past every SIMD width),
so each loop's edges run. A wrong answer anywhere is a reason in one line; a crash of the check
itself (a kernel that raises) is one too.
"""

from __future__ import annotations

import torch

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import first_line
from bitnet_cli.nn.bitlinear import BitLinear
from bitnet_cli.nn.fused_decode import FusedDecode
from bitnet_cli.nn.int8 import HEADS, LOGIT_BOUND, Int8Linear, to_int8
from bitnet_cli.nn.model import BitNetForCausalLM, KVCache

# Hidden 104: a tail of 8 past the float loops' 16 and 40 past the int8 head's 64; vocabulary
# 70: rows past the int8 head's groups of four.
SHAPE = dict(vocab_size=70, hidden_size=104, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=168, max_position_embeddings=8)


def self_check(ops, path: int) -> str | None:
    """Why the kernel is wrong on `path` (one line naming the entry point), or None."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same sums on any thread count; no waiting on busy cores
    try:
        with torch.inference_mode():
            return _sums(ops, path) or _layer(ops, path) or _half_head(ops, path) or \
                _decode(ops, path)
    except (RuntimeError, ValueError, IndexError) as e:
        return f"self-check failed on path {path} ({first_line(e)})"
    finally:
        torch.set_num_threads(threads)


def _sums(ops, path: int) -> str | None:
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 1, 1), (3, 255, 5), (5, 257, 9), (17, 1000, 33)):
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=generator)
        x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
        head = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
        if not torch.equal(ops.ternary_mm(x, ops.pack(codes), path),
                           (x.long() @ codes.long().T).int()):
            return f"ternary sums are wrong on path {path}"
        if not torch.equal(ops.int8_mm(x, head, path), (x.long() @ head.long().T).int()):
            return f"int8 head sums are wrong on path {path}"
    return None


def _layer(ops, path: int) -> str | None:
    torch.manual_seed(0)
    layer = BitLinear(300, 70)
    torch.nn.init.normal_(layer.weight, std=0.02)
    reference = Int8Linear.stacking(layer)
    x = torch.randn(5, 300)
    got = ops.ternary_linear(x, ops.pack(reference.codes), reference.scale, path)
    return None if torch.equal(got, reference(x)) else f"ternary_linear is wrong on path {path}"


def _half_head(ops, path: int) -> str | None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(37, 104, generator=generator).half()
    x = torch.randn(3, 104, generator=generator)
    exact = x.double() @ weight.double().T
    error = (ops.half_linear(x, weight, path).double() - exact).abs().max()
    return None if error <= 1e-5 * exact.abs().max() else f"half_linear is wrong on path {path}"


def _decode(ops, path: int) -> str | None:
    for head, activation in zip(HEADS, ("relu2", "silu", "relu2")):  # each head, both gates
        torch.manual_seed(0)
        model = BitNetForCausalLM(ModelConfig(activation=activation, **SHAPE)).eval()
        for weight in model.parameters():  # larger than init's 0.02: logits of size ~1
            torch.nn.init.normal_(weight, std=0.5)
        to_int8(model, head, ops=ops)
        per_op = model(torch.tensor([[3, 1, 4, 1, 5]]))[0]
        int8, two_bit = FusedDecode(model, ops, path), FusedDecode(model, ops, path)
        two_bit.weights = [ops.pack(codes) for codes in int8.weights]
        logits = [_steps(model, step) for step in (int8, two_bit)]
        where = f"decode_step with the {head} head on path {path}"
        if not torch.equal(logits[0], logits[1]):
            return f"{where}: 2-bit and int8 weights disagree"
        portable = min(ops.isas())  # plain C++: every CPU has it
        if path != portable and not torch.equal(logits[0],
                                                _steps(model, FusedDecode(model, ops, portable))):
            return f"{where}: not the portable path's floats"
        worst = ((logits[0] - per_op[1:]).abs().amax(-1) / per_op[1:].abs().amax(-1)).max()
        if not worst <= LOGIT_BOUND:
            return f"{where}: {float(worst):.2g} from the per-op model's logits"
        if not _batch_is_alone(model, two_bit):
            return f"decode_batch with the {head} head on path {path}: not the lone steps' logits"
    return None


def _batch_is_alone(model, step) -> bool:
    """Five sequences at different positions (a tile of four tokens and one more), one new token
    each, decoded together: whether each one's logits are those of its lone step."""
    prompts, tokens = [[3], [1, 4], [1, 5, 9], [2, 6], [5, 3, 5]], [8, 9, 7, 9, 3]

    def prompted() -> list[KVCache]:
        caches = [KVCache(model.config) for _ in prompts]
        for prompt, cache in zip(prompts, caches):
            model(torch.tensor([prompt]), cache, last_only=True)
        return caches

    alone = torch.cat([step(torch.tensor([[t]]), c)[0] for t, c in zip(tokens, prompted())])
    return torch.equal(step.batch(tokens, prompted()), alone)


def _steps(model, step) -> torch.Tensor:
    """Logits after each of the tokens 3 1 4 1, the first through the per-op model, the rest
    through `step`: those of positions 1-4."""
    cache = KVCache(model.config)
    model(torch.tensor([[3]]), cache, last_only=True)
    return torch.cat([step(torch.tensor([[token]]), cache)[0] for token in (1, 4, 1, 5)])
