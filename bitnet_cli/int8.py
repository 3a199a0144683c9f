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
embedding table stays float32, so the model's input is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.bitlinear import EPS, BitLinear, ternary_codes, weight_scale

ENGINES = ("int8", "float")


class Int8Linear(nn.Module):
    """Inference-only stand-in for a BitLinear: int8 ternary codes (out, in) and their scale."""

    def __init__(self, layer: BitLinear):
        super().__init__()
        w = layer.weight.detach()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.register_buffer("codes", ternary_codes(w).to(torch.int8))
        self.register_buffer("scale", weight_scale(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_codes, x_scale = activation_codes(x.reshape(-1, shape[-1]))
        # codes.t() is the (in, out) matrix _int_mm wants, as a view: the oneDNN kernel reads
        # the (out, in) rows directly, ~1.5x faster than from a contiguous (in, out) copy.
        acc = int_mm(x_codes, self.codes.t())
        return (acc / (x_scale * self.scale)).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitlinear.activation_quant stopped before its division: int8 codes and the per-token
    float32 scale, with codes / scale == activation_quant(x) exactly."""
    x = x.float()
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round_().clamp_(-128, 127).to(torch.int8), scale


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm (int8 x int8 -> int32). CPU takes any shape; CUDA wants more than 16 rows,
    so a short batch (decoding one token) is padded with zero rows that are dropped again."""
    rows = a.shape[0]
    if a.is_cuda and rows <= 16:
        a = F.pad(a, (0, 0, 0, 17 - rows))
    return torch._int_mm(a, b)[:rows]


class HalfHead(nn.Module):
    """The full-precision output projection stored in float16: half the bytes of float32 to read
    for every token, and rounding 8x finer than bfloat16's. One row (decoding a token) is
    multiplied in float16, a fast matrix-vector product on CPUs; several rows widen the weights
    to float32 first, because CPUs have no fast float16 matrix-matrix product."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight.detach().half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or x.numel() == x.shape[-1]:
            return F.linear(x.half(), self.weight).float()
        return F.linear(x.float(), self.weight.float())


def int8_unusable(device: torch.device, shapes: set[tuple[int, int]]) -> str | None:
    """Why torch._int_mm cannot serve these (in, out) shapes on this device, or None if it
    can: tried once on small inputs, result checked against an exact reference."""
    for k, n in sorted(shapes):
        a = torch.randint(-128, 128, (3, k), dtype=torch.int8)
        b = torch.randint(-1, 2, (n, k), dtype=torch.int8)
        try:
            got = int_mm(a.to(device), b.to(device).t()).cpu()
        except (RuntimeError, NotImplementedError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            return f"torch._int_mm fails on {device.type} for a {k}x{n} layer ({first_line})"
        if not torch.equal(got, a.long().mm(b.long().t()).int()):
            return f"torch._int_mm gives wrong results on {device.type} for a {k}x{n} layer"
    return None


def to_int8(model: nn.Module, half_head: bool = True) -> str | None:
    """Swap every BitLinear of `model` (in place) for an Int8Linear, and with `half_head` the
    output projection for a HalfHead. Returns why the model was left as it was, or None when it
    was converted."""
    bitlinears = [(parent, name, child) for parent in model.modules()
                  for name, child in parent.named_children() if isinstance(child, BitLinear)]
    if not bitlinears:
        return "it has no ternary layers (trained with --quant none), so it stays in float"
    device = bitlinears[0][2].weight.device
    if device.type != "cpu":
        why = int8_unusable(device, {(c.in_features, c.out_features) for _, _, c in bitlinears})
        if why:
            return why
    for parent, name, child in bitlinears:
        setattr(parent, name, Int8Linear(child))
    if half_head:
        model.lm_head = HalfHead(model.lm_head.weight)
    return None
