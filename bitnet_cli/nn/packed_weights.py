"""A checkpoint's tensors as the model takes them, however its ternary layers are stored.

A run bitnet trained stores float32 latent weights for every projection: training resumes from
them. A run made by `bitnet import` of a ternary model stores each projection as the released
BitNet b1.58 2B4T checkpoint does (and transformers' `quantization_mode: offline` reads it):

    <projection>.weight        uint8 (out/4, in). Byte row j holds output rows j, j + out/4,
                               j + out/2 and j + 3*out/4 in bits 0-1, 2-3, 4-5 and 6-7, each
                               weight stored as code + 1 (0, 1, 2 for -1, 0, +1).
    <projection>.weight_scale  float32 (1,): mean|W|, so the layer's weights are codes * scale.

and every other tensor in the source's dtype (2B4T: bfloat16). `ModelWeights` reads either:
the engines take a projection's codes as they are (`ternary`: no float32 copy of a layer), the
float engine codes / s, and training and export latent float32 weights (`[name]`) made as
codes * scale / p, p the layer's share of nonzero codes: BitNet's quantizer maps them back to
exactly those codes with mean|W| = scale, so the model they compute is the stored one.
"""

from __future__ import annotations

import math

import torch

from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.bitlinear import CODES_PER_BYTE, holds_a_three, ternary_codes, unpack_ternary
from bitnet_cli.store.checkpoint import ShapedTensors

SCALE_SUFFIX = "_scale"  # <projection>.weight_scale beside <projection>.weight
FLOAT_DTYPES = ("F32", "F16", "BF16")  # as safetensors headers name them


class ModelWeights(ShapedTensors):
    """The model's tensors by their state-dict names (a stored weight_scale folded into its
    layer), over `stored` (store.checkpoint.StoredTensors: shapes, dtypes, tensors read when
    asked). Shapes are the model's: a packed projection's (out, in), not its bytes'."""

    def __init__(self, stored):
        self.stored = stored
        self.packed = {name for name, dtype in stored.dtypes.items() if dtype == "U8"}
        self.shapes = {}
        for name, shape in stored.shapes.items():
            if name.endswith(SCALE_SUFFIX) and name[:-len(SCALE_SUFFIX)] in self.packed:
                continue
            dtype = stored.dtypes[name]
            if name in self.packed:
                self._check_packed(name, shape)
                shape = (shape[0] * CODES_PER_BYTE, shape[1])
            elif dtype not in FLOAT_DTYPES:
                self._damaged(f"{name} is {dtype}; weights are floats or packed uint8 codes")
            self.shapes[name] = shape

    def _check_packed(self, name: str, shape: tuple) -> None:
        scale = name + SCALE_SUFFIX
        if len(shape) != 2 or not name.endswith("_proj.weight"):
            self._damaged(f"{name} is uint8 of shape {list(shape)}: packed codes are a "
                          "projection's (out/4, in) bytes")
        if scale not in self.stored.shapes or self.stored.dtypes[scale] not in FLOAT_DTYPES \
                or math.prod(self.stored.shapes[scale]) != 1:
            self._damaged(f"packed {name} has no {scale} (one float)")

    def _damaged(self, why: str):
        raise BitnetError(f"{self.stored.file}: {why}; it may be damaged")

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor as stored, or a packed projection's latent float32 weights."""
        if name not in self.packed:
            return self.stored[name]
        codes, s = self.codes(name)
        codes = codes.float()
        nonzero = codes.abs().mean()
        # codes / s are the weights; over p their mean magnitude is 1 / s again
        return codes.div_(s * nonzero) if nonzero > 0 else codes

    def ternary(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, s) of a projection for the engines: its packed bytes (uint8, the layout
        above) where it is stored packed, else its latent weights' int8 codes; s is the
        quantizer's float32 multiplier (codes = round(W * s)), 1 / weight_scale."""
        if name not in self.packed:
            codes, s = ternary_codes(self.stored[name].float())
            return codes.to(torch.int8), s
        packed = self.stored[name]
        if holds_a_three(packed):
            self._damaged(f"{name} holds a code of 3 (codes are stored as 0, 1, 2)")
        scale = float(self.stored[name + SCALE_SUFFIX].reshape(()))
        if not 0 < scale < math.inf:
            self._damaged(f"{name + SCALE_SUFFIX} is {scale}, not a positive scale")
        return packed, torch.ones((), dtype=torch.float32) / scale

    def codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(int8 codes, s) of a projection, however it is stored."""
        weights, s = self.ternary(name)
        return as_codes(weights), s


def as_codes(weights: torch.Tensor) -> torch.Tensor:
    """int8 codes of a projection given as codes or as packed bytes (ModelWeights.ternary)."""
    return unpack_ternary(weights) if weights.dtype == torch.uint8 else weights
