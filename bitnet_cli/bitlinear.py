"""What "b1.58" means in code.

A BitLinear layer keeps full-precision latent weights for the optimizer, but every forward pass
sees them quantized to {-1, 0, +1} times one per-tensor scale (absmean), and sees its input
quantized to 8 bits per token (absmax). Rounding has no useful gradient, so the backward pass
treats both quantizers as the identity: the straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def weight_scale(w: torch.Tensor) -> torch.Tensor:
    """The absmean multiplier s = 1 / mean|W| (a 0-dim float32 tensor)."""
    return 1.0 / w.float().abs().mean().clamp(min=EPS)


def ternary_codes(w: torch.Tensor) -> torch.Tensor:
    """The ternary integers round(W * s) clamped to {-1, 0, 1}, as float32."""
    return (w.float() * weight_scale(w)).round().clamp(-1, 1)


def weight_quant(w: torch.Tensor) -> torch.Tensor:
    """W quantized to {-1, 0, 1} / s, in float32."""
    return ternary_codes(w) / weight_scale(w)


def activation_quant(x: torch.Tensor) -> torch.Tensor:
    """x quantized per token (last dim) to 256 levels: round(x * 127 / max|x|) / (127 / max|x|)."""
    x = x.float()
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True).clamp(min=EPS)
    return (x * scale).round().clamp(-128, 127) / scale


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward: exactly `quantized`. Backward: the gradient flows to `x` unchanged.

    Written as q + (x - x.detach()) rather than x + (q - x).detach(): the latter can be off by
    one float ulp from q, the former adds an exact zero.
    """
    return quantized.detach() + (x - x.detach())


class BitLinear(nn.Linear):
    """nn.Linear (no bias) with ternary weights and 8-bit activations in the forward pass."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)
        self._frozen: tuple | None = None  # (weight version, quantized weight) for inference

    def quantized_weight(self) -> torch.Tensor:
        if torch.is_grad_enabled():
            return straight_through(self.weight.float(), weight_quant(self.weight))
        # Without gradients the weights cannot be changing under us, so quantize them once
        # and reuse that until the tensor is modified (its version counter moves).
        key = (self.weight._version, self.weight.data_ptr(), self.weight.device)
        if self._frozen is None or self._frozen[0] != key:
            self._frozen = (key, weight_quant(self.weight))
        return self._frozen[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q = activation_quant(x)
        if torch.is_grad_enabled():
            x_q = straight_through(x.float(), x_q)
        return F.linear(x_q, self.quantized_weight())
