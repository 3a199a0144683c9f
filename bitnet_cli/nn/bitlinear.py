"""What "b1.58" means in code.

A BitLinear layer keeps full-precision latent weights for the optimizer, but every forward pass
sees them quantized to {-1, 0, +1} times one per-tensor scale (absmean), and sees its input
quantized to 8 bits per token (absmax). Rounding has no useful gradient, so the backward pass
treats both quantizers as the identity: the straight-through estimator.

For shipping, the ternary weights are stored as 2-bit codes, four to a byte, in the layout of the
released BitNet b1.58 2B4T checkpoint (`pack_ternary` / `unpack_ternary`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def ternary_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight quantizer, the one every path uses: the codes round(W * s) clamped to
    {-1, 0, 1} (float32) and the absmean multiplier s = 1 / mean|W| (a 0-dim float32 tensor).
    Rounded in place: each pass over the weights costs training time."""
    s = 1.0 / w.float().abs().mean().clamp(min=EPS)
    return (w.float() * s).round_().clamp_(-1, 1), s


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """W quantized to {-1, 0, 1} / s, in float32: what training and the float engine multiply."""
    codes, s = ternary_codes(w)
    return codes.div_(s)


def ternary_codes_and_scale(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W as int8 codes in {-1, 0, 1} and the one float32 multiplier (mean|W|) that restores it,
    as exports store them: codes * scale == weight_quant(w) exactly, because a code of +-1
    divided by s is the same float32 division as 1 / s."""
    codes, s = ternary_codes(w)
    return codes.to(torch.int8), torch.ones((), dtype=torch.float32) / s


def activation_codes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The activation quantizer, the one every path uses: per token (last dim) the codes
    round(x * 127 / max|x|) in [-127, 127] (float32) and that scale, 127 / max|x|. (No clamp:
    |x| * 127 / max|x| never rounds past 127.)"""
    x = x.float()
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round_(), scale


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """x quantized per token to 256 levels, in float32: codes / scale."""
    codes, scale = activation_codes(x)
    return codes.div_(scale)


class StraightThrough(torch.autograd.Function):
    """Forward: exactly `quantized`. Backward: the gradient flows to `x` unchanged. (The same
    as quantized.detach() + (x - x.detach()), without two passes over x to add an exact zero.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


straight_through = StraightThrough.apply


class BitLinear(nn.Linear):
    """nn.Linear (no bias) with ternary weights and 8-bit activations in the forward pass."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self._frozen: tuple | None = None  # (weight version, quantized weight) for inference
        self.step_weight: torch.Tensor | None = None  # set by quantized_for_step (training)

    def train(self, mode: bool = True) -> BitLinear:
        if mode:  # back to training: the inference copy would only hold memory until the next eval
            self._frozen = None
        return super().train(mode)

    def frozen_weight(self) -> torch.Tensor:
        """Without gradients the weights cannot be changing under us, so quantize them once
        and reuse that until the tensor is modified (its version counter moves)."""
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, weight_quant(self.weight))
        return self._frozen[1]

    def training_weight(self) -> torch.Tensor:
        """The quantized weight a training forward uses: the step's (see quantized_for_step),
        or quantized now."""
        if self.step_weight is not None:
            return self.step_weight
        with torch.no_grad():
            return weight_quant(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return F.linear(activation_quant(x), self.frozen_weight())
        # The quantizers' own graphs would never be used (the straight-through estimator stands
        # in for their gradient), so they run without autograd and save nothing for backward.
        with torch.no_grad():
            x_q = activation_quant(x)
        return F.linear(straight_through(x.float(), x_q),
                        straight_through(self.weight.float(), self.training_weight()))


class QuantizedLinear(nn.Module):
    """A BitLinear for inference alone (the float engine of a loaded model): only its ternary
    codes (as float32) and scale, so the model holds one copy of each layer instead of the
    latent weights and their quantized copy.

    It multiplies the codes themselves and divides by both scales once, as the int8 engine
    does: float32 holds every sum of products of codes exactly (|sum| <= 127 x in_features,
    below 2^24), in any order, so its outputs equal the int8 engine's bit for bit on every
    CPU. Multiplying codes / scale instead (training's form) rounds each product, and a CPU's
    summation order then decides which activations land on which side of a quantization
    boundary downstream."""

    def __init__(self, codes: torch.Tensor, s: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.float())
        self.register_buffer("s", s.float().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_codes, x_scale = activation_codes(x)
        return F.linear(x_codes, self.codes) / (x_scale * self.s)


class SharedInput(nn.Module):
    """Layers that read one input (q, k and v; gate and up), applied to it together: the
    contract an inference engine swaps whole (int8.to_int8 puts one stacked integer matrix in
    its place). It holds its layers without registering them, so their parameters keep the
    names of the module that owns them (self_attn.q_proj.weight, the 2B4T layout's).

    While training, one matmul over the layers' quantized weights side by side, each layer
    keeping its own scale: a CPU multiplies one wide matrix markedly faster than two or three
    narrow ones, and the input is quantized once. Without gradients (the float engine), each
    layer in turn."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = list(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        layers = self.layers
        kinds = {type(layer) for layer in layers}
        if not torch.is_grad_enabled() or len(kinds) > 1 or kinds - {BitLinear, nn.Linear}:
            return tuple(layer(x) for layer in layers)
        if kinds == {BitLinear}:
            with torch.no_grad():
                x_q = activation_quant(x)
            x = straight_through(x.float(), x_q)
            weight = torch.cat([straight_through(layer.weight.float(), layer.training_weight())
                                for layer in layers])
        else:
            weight = torch.cat([layer.weight for layer in layers])
        return F.linear(x, weight).split([layer.out_features for layer in layers], dim=-1)


class quantized_for_step:
    """Within it, every BitLinear of `model` uses its weights quantized once on entry: the
    micro-steps of one optimizer step (--grad-accum) all see the same weights, so quantizing
    them again for each is waste. On exit the copies are dropped, before the optimizer step
    would hold them beside its own state."""

    def __init__(self, model: nn.Module):
        self.layers = [m for m in model.modules() if isinstance(m, BitLinear)]

    def __enter__(self):
        with torch.no_grad():
            for layer in self.layers:
                layer.step_weight = weight_quant(layer.weight)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            layer.step_weight = None
        return False


CODES_PER_BYTE = 4


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Codes in {-1, 0, 1} of shape (out, in) as uint8 of shape (out/4, in), 2 bits per code.

    The layout of the released 2B4T checkpoint (and transformers' unpack_weights): the output
    rows are cut into four blocks of out/4, and byte j holds row j of each block, block b in bits
    2b..2b+1, stored as code + 1 (0, 1, 2).
    """
    out_features = codes.shape[0]
    if out_features % CODES_PER_BYTE:
        raise ValueError(f"cannot pack {out_features} output rows: not a multiple of {CODES_PER_BYTE}")
    if codes.numel() and codes.abs().max() > 1:
        raise ValueError("only ternary codes (-1, 0, 1) can be packed")
    stored = (codes.to(torch.int16) + 1).to(torch.uint8)
    blocks = stored.view(CODES_PER_BYTE, out_features // CODES_PER_BYTE, *codes.shape[1:])
    return blocks[0] | blocks[1] << 2 | blocks[2] << 4 | blocks[3] << 6


def unpack_ternary(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_ternary: int8 codes in {-1, 0, 1} of shape (4 * rows, ...)."""
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=packed.device)
    shifts = shifts.view(CODES_PER_BYTE, *[1] * packed.dim())
    stored = (packed.unsqueeze(0) >> shifts) & 3
    return stored.flatten(0, 1).to(torch.int8) - 1


def holds_a_three(packed: torch.Tensor) -> bool:
    """Whether pack_ternary's bytes hold a 2-bit value of 3 anywhere, which is no code (a damaged
    file): a pair with both bits set, found in place of the pair's low bit."""
    return bool((packed & (packed >> 1) & 0x55).any())
