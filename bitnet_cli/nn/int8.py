"""The fast int8 inference path: a trained model's BitLinear layers as integer matmuls.

Training sees each BitLinear's weights as ternary codes over a scale and its inputs as 8-bit
codes over a per-token scale, but multiplies the two in floating point. Here the codes stay
integers: the weights become int8 once at load, each input is quantized to int8 per token,
`torch._int_mm` sums the products exactly in int32 (on a CPU without the 2-bit kernel, fbgemm's
int8 GEMM sums the same integers faster), and one division by both scales gives the output. Same
maths as BitLinear; the only difference is float rounding (an exact integer sum against a
float32 one).

    y = (x_codes @ w_codes.T) / (x_scale * w_scale)

The full-precision head (32000 x 768 on the 95M shape: in float32 it is more bytes to read per
token than all the ternary layers in int8) is kept as a float16 copy by default (HalfHead); the
embedding table stays float32, so the model's input is unchanged, unless float16 holds it
exactly (a bf16 source): then the tied embedding reads the float16 copy (HalfEmbedding).
`head="float32"` keeps the head as it is: exact, for a model whose output layer float16 cannot
hold (see loading.py).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.errors import first_line
from bitnet_cli.nn.bitlinear import BitLinear, SharedInput, activation_codes, ternary_codes
from bitnet_cli.nn.half_head import HalfEmbedding, HalfHead
from bitnet_cli.nn.packed_weights import as_codes

ENGINES = ("2bit", "int8", "float")  # 2bit: nn/packed.py
# The engines' contract (README, "Three engines, the same model"): their logits agree within this
# share of the largest logit at each position, and their greedy tokens wherever the top two
# logits are further apart than twice it. The integer sums of the 2bit and int8 engines are
# identical everywhere; the floats around them differ by rounding, and an activation that lands
# within rounding of a quantization boundary may take either code (~1% of the largest logit).
LOGIT_BOUND = 0.03


def quantized(layer: BitLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's ternary weights as the engines take them, from its latent weights: int8 codes
    and the quantizer's multiplier s. (A loaded model may give packed bytes instead:
    packed_weights.ModelWeights.ternary.)"""
    codes, s = ternary_codes(layer.weight.detach())
    return codes.to(torch.int8), s


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
        self.fbgemm_codes = None  # the codes in fbgemm's packed layout, where kept so (instead)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)

    @classmethod
    def stacking(cls, *layers: BitLinear, weights_of=None) -> Int8Linear:
        """The layers' codes stacked, each from `weights_of(layer)` (see `quantized`)."""
        parts = [(as_codes(weights), s) for weights, s in map(weights_of or quantized, layers)]
        return cls(torch.cat([codes for codes, _ in parts]),
                   torch.cat([s.expand(len(codes)) for codes, s in parts]),
                   [len(codes) for codes, _ in parts])

    @classmethod
    def per_row(cls, weight: torch.Tensor, ops=None) -> Int8Linear:
        """A full-precision matrix rounded to int8 with one absmax scale per output row: the
        output layer, as an option (--head int8), at half of float16's bytes. Its codes span
        all of int8, which torch._int_mm does not sum exactly everywhere (oneDNN's AVX2 and
        SSE4.1 kernels saturate a pair of products at int16), so the kernel's int8_mm (`ops`)
        sums it where it is built."""
        # absmax per row, as for activations; a slice of rows at a time: no float32 table
        rows = [activation_codes(part.detach()) for part in weight.split(4096)]
        head = cls(torch.cat([codes.to(torch.int8) for codes, _ in rows]),
                   torch.cat([scale.squeeze(1) for _, scale in rows]), [len(weight)])
        head.ops = ops
        return head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_codes, x_scale = activation_codes(x.reshape(-1, shape[-1]))
        return (self.sums(x_codes) / (x_scale * self.scale)).reshape(*shape[:-1],
                                                                      self.out_features)

    def keep_in_fbgemm(self) -> None:
        """Keep the ternary codes only in fbgemm's packed layout, and sum them there: the int8
        engine on a CPU where the 2-bit kernel is not built (no compiler). At one token
        fbgemm's int8 GEMM is ~3x faster than torch._int_mm's oneDNN kernel on AVX2-only CPUs
        (1.7x with AVX-512), and it sums the same integers: each token's codes go in as uint8
        (code + 128, over a scale of 1), are summed against the int8 rows in int32 (AVX2's
        int16 pairs of products stay within 2 * 255 for ternary rows: no saturation), 128 times
        each row's sum is taken off again, and that int32 comes out converted to float32 and
        times scales of 1: the float32 that _int_mm's int32 becomes in forward's division. So
        the outputs are the same bit for bit."""
        self.fbgemm_codes = fbgemm_pack(self.codes)
        self.codes = None

    def sums(self, x_codes: torch.Tensor) -> torch.Tensor:
        """The exact integer sums of each token's codes (float32 whole numbers) against every
        row: int32, or fbgemm's float32 of them."""
        if self.fbgemm_codes is not None:
            return fbgemm_sums(x_codes, self.fbgemm_codes)
        x_codes = x_codes.to(torch.int8)
        # codes.t() is the (in, out) matrix _int_mm wants, as a view: the oneDNN kernel reads
        # the (out, in) rows directly, ~1.5x faster than from a contiguous (in, out) copy.
        if self.ops is not None and not x_codes.is_cuda:
            return self.ops.int8_mm(x_codes, self.codes, 0)
        return int_mm(x_codes, self.codes.t())

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each stacked layer's output, in the order they were given."""
        return self(x).split(self.splits, dim=-1)

    def extra_repr(self) -> str:
        held = ", fbgemm" if self.fbgemm_codes is not None else ""
        return f"in_features={self.in_features}, out_features={self.splits}, int8{held}"


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


# fbgemm multiplies unsigned 8-bit inputs: the codes (-127 to 127) plus this zero point are 1 to
# 255, which a scale of 1 quantizes them to exactly.
FBGEMM_ZERO_POINT = 128


def fbgemm_pack(codes: torch.Tensor):
    """int8 (out, in) codes in fbgemm's packed layout (a torch.classes.quantized object)."""
    with warnings.catch_warnings():
        # A qint8 tensor warns that quantized dtypes are deprecated: the day they are gone,
        # fbgemm_unusable says so before any layer is packed, and torch._int_mm sums instead.
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor", UserWarning)
        weight = torch._make_per_tensor_quantized_tensor(codes.contiguous(), 1.0, 0)
    return torch.ops.quantized.linear_prepack(weight, None)


def fbgemm_sums(x_codes: torch.Tensor, packed) -> torch.Tensor:
    """Rows of float32 codes against fbgemm_pack's rows: their exact integer sums, in float32."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        x_codes, 1.0, FBGEMM_ZERO_POINT, packed)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm (int8 x int8 -> int32). CPU takes any shape; CUDA wants more than 16 rows,
    so a short batch (decoding one token) is padded with zero rows that are dropped again."""
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = F.pad(a, (0, 0, 0, 17 - rows))
    return torch._int_mm(a, b)[:rows]


def int8_unusable(device: torch.device, shapes: set[tuple[int, int]],
                  low: int = -1, high: int = 1) -> str | None:
    """Why torch._int_mm cannot serve these (in, out) shapes, with weights from `low` to `high`
    (ternary by default), on this device, or None if it can."""
    return inexact_sums("torch._int_mm", device.type,
                        lambda a, b: int_mm(a.to(device), b.to(device).t()).cpu(),
                        shapes, low, high)


def fbgemm_unusable(shapes: set[tuple[int, int]]) -> str | None:
    """Why fbgemm cannot sum these (in, out) ternary shapes exactly on this CPU
    (Int8Linear.keep_in_fbgemm), or None if it can: a torch without its ops, or a CPU whose
    kernels get them wrong."""
    return inexact_sums("fbgemm's int8 GEMM", "cpu",
                        lambda a, b: fbgemm_sums(a.float(), fbgemm_pack(b)), shapes)


def inexact_sums(name: str, where: str, sums, shapes: set[tuple[int, int]],
                 low: int = -1, high: int = 1) -> str | None:
    """Why `sums(a, b)` does not give the integer sums a @ b.T for int8 inputs `a` (-127 to 127)
    and int8 rows `b` (`low` to `high`) of these (in, out) shapes, or None where it does: tried
    once on small inputs, for one row and for several, the largest sums of either sign
    included, against an exact int64 reference."""
    for k, n in sorted(shapes):
        a = torch.randint(-127, 128, (3, k), dtype=torch.int8)
        a[0], a[1] = 127, -127
        b = torch.randint(low, high + 1, (n, k), dtype=torch.int8)
        b[0], b[-1] = high, low
        for rows in (a[:1], a):
            try:
                got = sums(rows, b)
            except (RuntimeError, NotImplementedError, AttributeError) as e:
                return f"{name} fails on {where} for a {k}x{n} layer ({first_line(e)})"
            if not torch.equal(got.double(), rows.long().mm(b.long().t()).double()):
                return f"{name} gives wrong results on {where} for a {k}x{n} layer"
    return None


def fbgemm_stacking(*layers: BitLinear, weights_of=None) -> Int8Linear:
    """Int8Linear.stacking, the codes then kept in fbgemm's layout (Int8Linear.keep_in_fbgemm)."""
    whole = Int8Linear.stacking(*layers, weights_of=weights_of)
    whole.keep_in_fbgemm()
    return whole


HEADS = ("float16", "float32", "int8")


def to_int8(model: nn.Module, head: str = "float16", linear=Int8Linear,
            weights_of=quantized, head_is_half_exact: bool = False, ops=None) -> str | None:
    """Swap every BitLinear of `model` (in place) for an Int8Linear (or the `linear` class
    given), and the output projection for a HalfHead (float16) or a per-row Int8Linear (int8),
    or not at all (float32). A float16 head that holds the weights exactly
    (`head_is_half_exact`) and is tied to the embedding serves it too (HalfEmbedding); the head
    goes first, so the float32 table is gone before the layers are converted.
    `weights_of(layer)` gives a layer's codes and scale (`quantized`: from its latent weights; a
    model loaded for use reads them from the file a group at a time instead); `ops`, the 2-bit kernel where it is built, serves the
    float16 head's few-row products (HalfHead). Without it, on a CPU, the Int8Linears keep their
    codes in fbgemm's layout where fbgemm sums every shape exactly (the same outputs, faster).
    Returns why the model was left as it was, or None when it was converted."""
    bitlinears = [(parent, name, child) for parent in model.modules()
                  for name, child in parent.named_children() if isinstance(child, BitLinear)]
    if not bitlinears:
        return "it has no ternary layers (trained with --quant none), so it stays in float"
    device = model.lm_head.weight.device
    shapes = {(c.in_features, c.out_features) for _, _, c in bitlinears}
    if device.type != "cpu":
        why = int8_unusable(device, shapes)
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
    stacking = linear.stacking
    no_kernel = linear is Int8Linear and ops is None and device.type == "cpu"
    if no_kernel and not fbgemm_unusable(shapes):
        stacking = fbgemm_stacking  # fbgemm sums the codes fastest without the 2-bit kernel
    stacked = {}  # each BitLinear of a SharedInput -> its place in one stacked matrix
    for parent in list(model.modules()):
        for name, group in list(parent.named_children()):
            if isinstance(group, SharedInput):
                whole = stacking(*group.layers, weights_of=weights_of)
                for layer in group.layers:  # its float weights are spent: free them now
                    layer.to_empty(device="meta")
                setattr(parent, name, Int8SharedInput(whole))
                for index, layer in enumerate(group.layers):
                    stacked[id(layer)] = Int8Part(whole, index)
    for parent, name, child in bitlinears:
        if id(child) not in stacked:
            stacked[id(child)] = stacking(child, weights_of=weights_of)
            child.to_empty(device="meta")
        setattr(parent, name, stacked[id(child)])
    return None
