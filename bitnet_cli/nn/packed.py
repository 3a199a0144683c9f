"""The 2bit engine: the int8 engine with each ternary matrix stored at 2 bits a weight.

Decoding a token reads every weight once, so the bytes read are the time: the int8 engine
reads 8 bits per ternary weight where 2 hold it. Here the codes are packed four to a byte once
at load, and the compiled kernel (ternary_kernel.cpp, built and checked by kernel.py) multiplies the
packed rows by the same int8 input codes, with SIMD on x86 (AVX-512 VNNI, else AVX2) and plain
C++ elsewhere. Its int32 sums are the exact integers `torch._int_mm` gives, and the one
rescale is the same float32 division, so the outputs equal the int8 engine's bit for bit.
The output layer is the int8 engine's (a float16 copy, or int8 rows with --head int8).
"""

from __future__ import annotations

import torch
from torch import nn

from bitnet_cli.nn.int8 import Int8Linear, to_int8
from bitnet_cli.nn.kernel import ternary_ops

KERNEL_PATH = 0  # the fastest path kernel.py allows (cpu/kernels.h numbers the others)


class PackedLinear(Int8Linear):
    """An Int8Linear whose ternary codes are kept packed, 2 bits each, for the kernel."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, splits: list[int]):
        nn.Module.__init__(self)
        self.ops, _ = ternary_ops()
        self.out_features, self.in_features = codes.shape
        self.splits = splits
        self.register_buffer("packed", self.ops.pack(codes.cpu()))
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantizing, the sums and the rescale in one call: at one token, the dozen small torch
        # ops the int8 engine spends around each matmul cost more than the matmul.
        shape = x.shape
        out = self.ops.ternary_linear(x.reshape(-1, shape[-1]).float(), self.packed, self.scale,
                                      KERNEL_PATH)
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.splits}, 2-bit"


def to_packed(model: nn.Module, head: str = "float16", load=lambda layer: None,
              head_is_half_exact: bool = False) -> str | None:
    """Swap every BitLinear of a CPU model (in place) for a PackedLinear, and the output layer as
    the int8 engine does (`load` and `head_is_half_exact` as there). Returns why it was not
    converted (then the model is unchanged), or None."""
    if model.lm_head.weight.device.type != "cpu":
        return "it runs on CPUs only"
    ops, why = ternary_ops()
    if ops is None:
        return why
    return to_int8(model, head, linear=PackedLinear, load=load,
                   head_is_half_exact=head_is_half_exact, ops=ops)
