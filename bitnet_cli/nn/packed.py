"""The 2bit engine: the int8 engine with each ternary matrix stored at 2 bits a weight.

Decoding a token reads every weight once, so the bytes read are the time: the int8 engine
reads 8 bits per ternary weight where 2 hold it. Here the codes are packed four to a byte once
at load, and the compiled kernel (nn/cpu/, built and checked by kernel.py) multiplies the packed
rows by the same int8 input codes, with SIMD on x86 (AVX-512 VNNI, AVX-VNNI or AVX2) and ARM
(NEON, with sdot where the CPU has it) and plain C++ elsewhere. Its int32 sums are the exact integers `torch._int_mm` gives, and the one
rescale is the same float32 division, so the outputs equal the int8 engine's bit for bit.
The output layer is the int8 engine's (a float16 copy, or int8 rows with --head int8).
"""

from __future__ import annotations

import torch
from torch import nn

from bitnet_cli.nn.bitlinear import CODES_PER_BYTE
from bitnet_cli.nn.int8 import Int8Linear, quantized, to_int8
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.packed_weights import as_codes

KERNEL_PATH = 0  # the fastest path kernel.py allows (cpu/kernels.h numbers the others)


class PackedLinear(nn.Module):
    """One BitLinear at inference, or several that read the same input (q, k and v; gate and
    up) stacked as one matrix: its ternary codes packed 2 bits each in the kernel's layout, each
    output row's scale, and the kernel (`ops`) that multiplies them, as the int8 engine's
    Int8Linear would."""

    def __init__(self, packed: torch.Tensor, in_features: int, scale: torch.Tensor,
                 splits: list[int], ops):
        super().__init__()
        self.ops = ops
        self.out_features, self.in_features = sum(splits), in_features
        self.splits = splits
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)

    @classmethod
    def stacking(cls, *layers, weights_of=None) -> PackedLinear:
        """The layers' codes and scales as the int8 engine takes them (`weights_of`), packed:
        bytes in the released layout go into the kernel's straight (each holds whole groups of
        four rows, so their packs stack), codes are packed."""
        parts = list(map(weights_of or quantized, layers))
        ops = ternary_ops()[0]
        released = all(weights.dtype == torch.uint8 for weights, _ in parts)
        splits = [CODES_PER_BYTE * len(w) if released else len(w) for w, _ in parts]
        if released:
            packed = torch.cat([ops.repack(weights) for weights, _ in parts])
        else:
            packed = ops.pack(torch.cat([as_codes(weights) for weights, _ in parts]))
        scale = torch.cat([s.expand(rows) for (_, s), rows in zip(parts, splits)])
        return cls(packed, parts[0][0].shape[1], scale, splits, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Quantizing, the sums and the rescale in one call: at one token, the dozen small torch
        # ops the int8 engine spends around each matmul cost more than the matmul.
        shape = x.shape
        out = self.ops.ternary_linear(x.reshape(-1, shape[-1]).float(), self.packed, self.scale,
                                      KERNEL_PATH)
        return out.reshape(*shape[:-1], self.out_features)

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Each stacked layer's output, in the order they were given."""
        return self(x).split(self.splits, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.splits}, 2-bit"


ENGINE_LINEARS = (Int8Linear, PackedLinear)  # a BitLinear as the int8 and 2bit engines run it


def to_packed(model: nn.Module, head: str = "float16", weights_of=quantized,
              head_is_half_exact: bool = False) -> str | None:
    """Swap every BitLinear of a CPU model (in place) for a PackedLinear, and the output layer as
    the int8 engine does (`weights_of` and `head_is_half_exact` as there). Returns why it was not
    converted (then the model is unchanged), or None."""
    if model.lm_head.weight.device.type != "cpu":
        return "it runs on CPUs only"
    ops, why = ternary_ops()
    if ops is None:
        return why
    return to_int8(model, head, linear=PackedLinear, weights_of=weights_of,
                   head_is_half_exact=head_is_half_exact, ops=ops)
