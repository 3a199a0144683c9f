"""The fast int8 inference path: a trained model's BitLinear layers as integer matmuls.

Training sees each BitLinear's weights as ternary codes over a scale and its inputs as 8-bit
codes over a per-token scale, but multiplies the two in floating point. Here the codes stay
integers: the weights become int8 once at load, each input is quantized to int8 per token,
`torch._int_mm` sums the products exactly in int32, and one division by both scales gives the
output. Same maths as BitLinear; the only difference is float rounding (an exact integer sum
against a float32 one).

    y = (x_codes @ w_codes.T) / (x_scale * w_scale)

The full-precision head (32000 x 768 on the 95M shape: in float32 it is more bytes to read per
token than all the ternary layers in int8) is kept as a float16 copy by default (HalfHead); the
embedding table stays float32, so the model's input is unchanged, unless float16 holds it
exactly (a bf16 source): then the tied embedding reads the float16 copy (HalfEmbedding).
`head="float32"` keeps the head as it is: exact, for a model whose output layer float16 cannot
hold (see loading.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.errors import first_line
from bitnet_cli.nn.bitlinear import BitLinear, SharedInput, activation_codes, ternary_codes

ENGINES = ("2bit", "int8", "float")  # 2bit: nn/packed.py
# The engines' contract (README, "Three engines, the same model"): their logits agree within this
# share of the largest logit at each position, and their greedy tokens wherever the top two
# logits are further apart than twice it. The integer sums of the 2bit and int8 engines are
# identical everywhere; the floats around them differ by rounding, and an activation that lands
# within rounding of a quantization boundary may take either code (~1% of the largest logit).
LOGIT_BOUND = 0.03


class Int8Linear(nn.Module):
    """Inference-only stand-in for one BitLinear, or for several that read the same input (q, k
    and v; gate and up): their int8 ternary codes stacked as one (out, in) matrix, and each
    output row's scale. One matrix means the input is quantized once and multiplied once, where
    separate layers would pay both, and the per-call overheads, two or three times over: on a
    small model decoding a token, those overheads are most of the time."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, splits: list[int]):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.splits = splits
        self.ops = None  # the 2-bit kernel, for the int8 head's full-range sums (per_row)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @classmethod
    def stacking(cls, *layers: BitLinear) -> Int8Linear:
        quantized = [ternary_codes(layer.weight.detach()) for layer in layers]
        return cls(torch.cat([codes for codes, _ in quantized]).to(torch.int8),
                   torch.cat([s.expand(len(codes)) for codes, s in quantized]),
                   [len(codes) for codes, _ in quantized])

    @classmethod
    def per_row(cls, weight: torch.Tensor, ops=None) -> Int8Linear:
        """A full-precision matrix rounded to int8 with one absmax scale per output row: the
        output layer, as an option (--head int8), at half of float16's bytes. Its codes span
        all of int8, which torch._int_mm does not sum exactly everywhere (oneDNN's AVX2 and
        SSE4.1 kernels saturate a pair of products at int16), so the kernel's int8_mm (`ops`)
        sums it where it is built."""
        codes, scale = activation_codes(weight.detach())  # absmax per row, as for activations
        head = cls(codes.to(torch.int8), scale.squeeze(1), [len(codes)])
        head.ops = ops
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_codes, x_scale = activation_codes(x.reshape(-1, shape[-1]))
        x_codes = x_codes.to(torch.int8)
        # codes.t() is the (in, out) matrix _int_mm wants, as a view: the oneDNN kernel reads
        # the (out, in) rows directly, ~1.5x faster than from a contiguous (in, out) copy.
        if self.ops is not None and not x.is_cuda:
            acc = self.ops.int8_mm(x_codes, self.codes, 0)
        else:
            acc = int_mm(x_codes, self.codes.t())
        return (acc / (x_scale * self.scale)).reshape(*shape[:-1], self.out_features)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each stacked layer's output, in the order they were given."""
        return self(x).split(self.splits, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.splits}, int8"


class Int8SharedInput(nn.Module):
    """A SharedInput's layers as one stacked Int8Linear: the input quantized once, one integer
    matmul, each layer's output split off."""

    def __init__(self, whole: Int8Linear):
        super().__init__()
        self.whole = whole

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.whole.parts(x)


class Int8Part(nn.Module):
    """One layer's place in a stacked Int8Linear, for a call of that layer alone (the model
    calls them together, through Int8SharedInput): just its own rows."""

    def __init__(self, whole: Int8Linear, index: int):
        super().__init__()
        self.whole, self.index = whole, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.whole.parts(x)[self.index]


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm (int8 x int8 -> int32). CPU takes any shape; CUDA wants more than 16 rows,
    so a short batch (decoding one token) is padded with zero rows that are dropped again."""
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = F.pad(a, (0, 0, 0, 17 - rows))
    return torch._int_mm(a, b)[:rows]


class HalfHead(nn.Module):
    """The full-precision output projection stored in float16: half the bytes of float32 to read
    for every token, and rounding 8x finer than bfloat16's. The products and sums are float32
    for one row as for many (the input is not rounded to float16, nor are the logits: float16
    logits would turn near ties into exact ties, broken differently by each CPU's kernels).
    A few rows (decoding, the prompt's last position) go through the kernel's float16 rows
    (`ops`, the 2-bit kernel's half_linear) where it is built; otherwise the table is widened to
    float32 a slice at a time, so no float32 copy of it is ever whole in memory."""

    SLICE = 4096  # rows widened at a time: 40 MB at 2B4T's width
    FEW = 4  # up to this many input rows, the kernel's rows beat widening

    def __init__(self, weight: torch.Tensor, ops=None):
        super().__init__()
        self.register_buffer("weight", weight.detach().half())
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        if self.ops is not None and not x.is_cuda and len(rows) <= self.FEW:
            out = self.ops.half_linear(rows, self.weight, 0)
        else:
            out = torch.cat([F.linear(rows, part.float()) for part in self.weight.split(self.SLICE)],
                            dim=-1)
        return out.reshape(*x.shape[:-1], len(self.weight))


class HalfEmbedding(nn.Module):
    """The token embedding read from a float16 table (the output layer's own), as float32: where
    float16 holds the trained table exactly, the model's input is unchanged and the float32
    copy (1.3 GB at 2B4T's shape) is not kept."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float()


def exact_in_float16(weight: torch.Tensor) -> bool:
    """Whether float16 holds these weights to its finest step, 2**-24 (a bfloat16 or float16
    source: 2B4T's; bfloat16 values below float16's normal range lose bits, not accuracy)."""
    return all(float((rows.half().float() - rows).abs().max()) <= 2 ** -25
               for rows in weight.detach().split(4096))


def int8_unusable(device: torch.device, shapes: set[tuple[int, int]],
                  low: int = -1, high: int = 1) -> str | None:
    """Why torch._int_mm cannot serve these (in, out) shapes, with weights from `low` to `high`
    (ternary by default), on this device, or None if it can: tried once on small inputs, the
    result checked against an exact reference."""
    for k, n in sorted(shapes):
        a = torch.randint(-127, 128, (3, k), dtype=torch.int8)
        b = torch.randint(low, high + 1, (n, k), dtype=torch.int8)
        try:
            got = int_mm(a.to(device), b.to(device).t()).cpu()
        except (RuntimeError, NotImplementedError) as e:
            return (f"torch._int_mm fails on {device.type} for a {k}x{n} layer "
                    f"({first_line(e)})")
        if not torch.equal(got, a.long().mm(b.long().t()).int()):
            return f"torch._int_mm gives wrong results on {device.type} for a {k}x{n} layer"
    return None


HEADS = ("float16", "float32", "int8")


def to_int8(model: nn.Module, head: str = "float16", linear=Int8Linear,
            load=lambda layer: None, head_is_half_exact: bool = False, ops=None) -> str | None:
    """Swap every BitLinear of `model` (in place) for an Int8Linear (or the `linear` subclass
    given), and the output projection for a HalfHead (float16) or a per-row Int8Linear (int8),
    or not at all (float32). A float16 head that holds the weights exactly
    (`head_is_half_exact`) and is tied to the embedding serves it too (HalfEmbedding); the head
    goes first, so the float32 table is gone before the layers are converted.
    `load(layer)` gives a layer its weights just before they are converted (a model loaded for
    use keeps them in the file until then); `ops`, the 2-bit kernel where it is built, serves the
    float16 head's few-row products (HalfHead). Returns why the model was left as it was, or None
    when it was converted."""
    bitlinears = [(parent, name, child) for parent in model.modules()
                  for name, child in parent.named_children() if isinstance(child, BitLinear)]
    if not bitlinears:
        return "it has no ternary layers (trained with --quant none), so it stays in float"
    device = model.lm_head.weight.device
    if device.type != "cpu":
        why = int8_unusable(device, {(c.in_features, c.out_features) for _, _, c in bitlinears})
        if why:
            return why
    weight = model.lm_head.weight
    if head == "int8" and (ops is None or device.type != "cpu"):
        why = int8_unusable(device, {(weight.shape[1], 64)}, -128, 127)
        if why:
            return f"--head int8 needs exact int8 sums, and {why}"
    if head != "float32":
        model.lm_head = (HalfHead(weight, ops) if head == "float16"
                         else Int8Linear.per_row(weight, ops if device.type == "cpu" else None))
    embedding = model.model.embed_tokens
    if head == "float16" and head_is_half_exact and embedding.weight is weight:
        model.model.embed_tokens = HalfEmbedding(model.lm_head.weight)
    del weight, embedding
    stacked = {}  # each BitLinear of a SharedInput -> its place in one stacked matrix
    for parent in list(model.modules()):
        for name, group in list(parent.named_children()):
            if isinstance(group, SharedInput):
                for layer in group.layers:
                    load(layer)
                whole = linear.stacking(*group.layers)
                for layer in group.layers:  # its float weights are spent: free them now
                    layer.to_empty(device="meta")
                setattr(parent, name, Int8SharedInput(whole))
                for index, layer in enumerate(group.layers):
                    stacked[id(layer)] = Int8Part(whole, index)
    for parent, name, child in bitlinears:
        if id(child) not in stacked:
            load(child)
            stacked[id(child)] = linear.stacking(child)
            child.to_empty(device="meta")
        setattr(parent, name, stacked[id(child)])
    return None
