"""The output layer as the int8 and 2bit engines keep it by default: the full-precision table in
float16 (HalfHead), and the token embedding read from that same table where float16 holds it
exactly (HalfEmbedding). int8.py's to_int8 puts them in place."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HalfHead(nn.Module):
    """The full-precision output projection stored in float16: half the bytes of float32 to read
    for every token, and rounding 8x finer than bfloat16's. The products and sums are float32
    for one row as for many (the input is not rounded to float16, nor are the logits: float16
    logits would turn near ties into exact ties, broken differently by each CPU's kernels).
    A few rows (decoding, the prompt's last position) go through the kernel's float16 rows
    (`ops`, the 2-bit kernel's half_linear) where it is built, else through fbgemm's float16
    GEMM where torch has it (a packed copy of the table: one more float16 table in memory, for
    one token ~2x faster than widening at 95M's shape, more at 2B4T's); otherwise the table is
    widened to float32 a slice at a time, so no float32 copy of it is ever whole in memory.
    Each sums in its own order, so their logits differ by float rounding, as two CPUs' do."""

    SLICE = 4096  # rows widened at a time: 40 MB at 2B4T's width
    FEW = 4  # up to this many input rows, the kernel's rows (or fbgemm's) beat widening

    def __init__(self, weight: torch.Tensor, ops=None):
        super().__init__()
        self.register_buffer("weight", weight.detach().half())
        self.ops = ops
        self.packed = fbgemm_half_pack(self.weight) if ops is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        few = not x.is_cuda and len(rows) <= self.FEW
        if few and self.ops is not None:
            out = self.ops.half_linear(rows, self.weight, 0)
        elif few and self.packed is not None:
            out = torch.cat([torch.ops.quantized.linear_dynamic_fp16(rows, part)
                             for part in self.packed], dim=-1)
        else:
            out = torch.cat([F.linear(rows, part.float()) for part in self.weight.split(self.SLICE)],
                            dim=-1)
        return out.reshape(*x.shape[:-1], len(self.weight))


def fbgemm_half_pack(weight: torch.Tensor) -> list | None:
    """A float16 table as fbgemm's packed float16 matrices, HalfHead.SLICE rows each (packing
    widens its input to float32: one slice at a time), or None where fbgemm cannot serve it:
    not on the CPU, a torch without the ops, or sums outside float32's rounding."""
    if weight.device.type != "cpu" or not fbgemm_half_sums_in_float32(weight.shape[1]):
        return None
    return [torch.ops.quantized.linear_prepack_fp16(part.float(), None)
            for part in weight.split(HalfHead.SLICE)]


def fbgemm_half_sums_in_float32(width: int) -> bool:
    """Whether fbgemm's float16 GEMM runs here and gives a float16 table's products with
    float32 inputs within float32's rounding of their exact sums (k * 2**-24 of the sum of their
    magnitudes): tried once on small random inputs of this width."""
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(300, width, generator=generator).half()
    x = torch.randn(2, width, generator=generator)
    try:
        got = torch.ops.quantized.linear_dynamic_fp16(
            x, torch.ops.quantized.linear_prepack_fp16(table.float(), None))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    exact = x.double() @ table.double().T
    bound = width * 2**-24 * (x.double().abs() @ table.double().abs().T)
    return got.dtype == torch.float32 and bool(((got.double() - exact).abs() <= bound).all())


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
    if weight.dtype == torch.float16:
        return True
    if weight.dtype == torch.bfloat16:  # its 8 bits of mantissa fit float16's 10: only range
        low, high = torch.aminmax(weight)
        return bool(-HALF_MAX <= low) and bool(high <= HALF_MAX)
    return all(float((rows.half().float() - rows).abs().max()) <= 2 ** -25
               for rows in weight.detach().split(4096))


HALF_MAX = 65504.0  # float16's largest finite value
