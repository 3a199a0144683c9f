"""A released checkpoint's tensors as an imported run stores them (nn/packed_weights.py):
renamed to bitnet's state dict, checked against the shapes the config declares, every ternary
projection as 2-bit packed codes and its weight_scale (packed sources' bytes as they are,
latent weights quantized and packed), every other tensor, and every projection of a
full-precision model (a Llama's), in the source's float dtype. Read from safetensors only, a
tensor at a time."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.nn.bitlinear import (CODES_PER_BYTE, holds_a_three, pack_ternary,
                                     ternary_codes_and_scale)
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.nn.packed_weights import FLOAT_DTYPES, SCALE_SUFFIX
from bitnet_cli.store.checkpoint import ShapedTensors

RENAMED = {"1bitllm": {".self_attn.inner_attn_ln.": ".self_attn.attn_sub_norm.",
                       ".mlp.ffn_layernorm.": ".mlp.ffn_sub_norm."}}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a cache some exports keep: recomputed here
PIECE_ELEMENTS = 1 << 23  # a piece of a float tensor read at a time: 16-32 MB


class RunTensors(ShapedTensors):
    """Every tensor the imported run stores, by its name there, made when asked (one at a
    time, so a 2B model is never whole in memory); `shapes` and `dtypes` say what each will be.
    The source's names, shapes and dtypes are checked when this is made, from the files'
    headers. `divisor`: how a packed source's weight_scale reads (True: 1/mean|W|,
    transformers' bitlinear; False: mean|W|; None: the config declares no packed weights)."""

    def __init__(self, folder: Path, config: ModelConfig, layout: str, divisor: bool | None):
        self.folder, self.divisor, self.ternary = folder, divisor, config.quant == "ternary"
        self.raw = _safetensors(folder)
        with torch.device("meta"):
            model = BitNetForCausalLM(config)
        self.model_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if config.tie_word_embeddings:
            self.model_shapes.pop("lm_head.weight")
        self.sources = _sources(self.raw, layout, config.tie_word_embeddings)
        scales = {n for n in self.sources if n.endswith(".weight_scale") and self.ternary}
        unexpected = sorted(set(self.sources) - set(self.model_shapes) - scales)
        if unexpected:
            raise BitnetError(f"{folder}: unexpected tensor {self.sources[unexpected[0]]!r} for "
                              "the architecture config.json declares")
        self.shapes, self.dtypes = {}, {}
        for name, shape in self.model_shapes.items():
            self._check(name, shape)
            if self.ternary and name.endswith("_proj.weight") and shape[0] % CODES_PER_BYTE == 0:
                self.shapes[name] = (shape[0] // CODES_PER_BYTE, shape[1])
                self.dtypes[name] = "U8"
                self.shapes[name + SCALE_SUFFIX], self.dtypes[name + SCALE_SUFFIX] = (1,), "F32"
            else:  # as stored: a full-precision model, a projection packing cannot group
                self.shapes[name], self.dtypes[name] = shape, self.raw[self.sources[name]][1]

    def _check(self, name: str, shape: tuple) -> None:
        if name not in self.sources:
            raise BitnetError(f"{self.folder}: tensor {name!r} is missing")
        theirs = self.sources[name]
        _, dtype, stored = self.raw[theirs]
        if dtype == "U8" and self.ternary:  # packed ternary codes
            out_features, in_features = shape if len(shape) == 2 else (0, 0)
            if self.divisor is None:
                raise BitnetError(f"{self.folder}: tensor {theirs!r} holds packed uint8 codes, "
                                  "but config.json has no quantization_config saying how its "
                                  "weight_scale reads (quantization_mode offline)")
            if not name.endswith("_proj.weight") or stored != (out_features // CODES_PER_BYTE,
                                                               in_features):
                raise BitnetError(f"{self.folder}: tensor {theirs!r} is uint8 of shape "
                                  f"{list(stored)}; packed codes of this tensor would be "
                                  f"{[out_features // CODES_PER_BYTE, in_features]}")
            scale = name[:-len("weight")] + "weight_scale"
            if scale not in self.sources:
                raise BitnetError(f"{self.folder}: packed {theirs!r} has no {scale!r}")
            if self.raw[self.sources[scale]][1] not in FLOAT_DTYPES:
                raise BitnetError(f"{self.folder}: {self.sources[scale]!r} must be a float")
            return
        if stored != shape:
            raise BitnetError(f"{self.folder}: tensor {theirs!r} has shape {list(stored)}, the "
                              f"config says {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise BitnetError(f"{self.folder}: tensor {theirs!r} is {dtype}; weights must be "
                              "F32, F16 or BF16" + (" (or U8 packed codes)" if self.ternary
                                                    else ""))
        if self.sources.get(name + SCALE_SUFFIX):
            raise BitnetError(f"{self.folder}: {theirs!r} is a float weight with a weight_scale "
                              "beside it, which bitnet does not apply; import the packed or the "
                              "latent (-bf16) release instead")

    def __getitem__(self, name: str) -> torch.Tensor:
        return torch.cat(list(self.pieces(name)))

    def pieces(self, name: str):
        """The tensor `name` in pieces of rows that make it whole in order, a few tens of MB
        each: 2B4T's bf16 embedding (656 MB) is never whole in memory while it is copied."""
        if name.endswith(SCALE_SUFFIX):
            yield self._packed(name[:-len(SCALE_SUFFIX)])[1]
        elif self.dtypes[name] == "U8":
            yield self._packed(name)[0]
        else:
            yield from self._read(name)

    def _read(self, name: str):
        """The source's float tensor `name` in pieces of rows, each checked to be finite."""
        theirs = self.sources[name]
        file, _, shape = self.raw[theirs]
        rows = max(1, PIECE_ELEMENTS // max(1, math.prod(shape[1:])))
        for start in range(0, max(shape[0], 1), rows) if shape else [None]:
            piece = _load(file, theirs, None if start is None else (start, start + rows))
            if not bool(torch.isfinite(piece).all()):
                raise BitnetError(f"{self.folder}: tensor {theirs!r} holds NaN or infinite "
                                  "values; the source is damaged")
            yield piece

    def _packed(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A projection's packed codes and weight_scale (mean|W|, float32 of shape (1,)):
        a packed source's bytes as they are, latent weights quantized as BitNet does."""
        if self.raw[self.sources[name]][1] != "U8":
            codes, scale = ternary_codes_and_scale(torch.cat(list(self._read(name))).float())
            return pack_ternary(codes), scale.reshape(1)
        return _checked_packed(name, self.sources, self.raw, self.divisor, self.folder)


def _sources(raw: dict, layout: str, tied: bool) -> dict[str, str]:
    """Our name -> the source's, for every tensor but caches that are recomputed."""
    def ours(name: str) -> str:
        for theirs, mine in RENAMED.get(layout, {}).items():
            name = name.replace(theirs, mine)
        return name
    sources = {ours(name): name for name in raw if not IGNORED.match(name)}
    if tied:
        sources.pop("lm_head.weight", None)  # a tied head some writers store twice
    return sources


def _safetensors(folder: Path) -> dict:
    """name -> (file, dtype, shape) of every tensor in the folder's safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickles:
            raise BitnetError(f"{folder} holds its weights only as {pickles[0]}, a pickle file, "
                              "which bitnet never loads; convert it to safetensors first")
        raise BitnetError(f"{folder} has no .safetensors weights (bitnet reads safetensors only; "
                          "a pickle checkpoint is never loaded)")
    found = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    found[name] = (file, part.get_dtype(), tuple(part.get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise BitnetError(f"{file} cannot be read ({first_line(e, 120)})") from None
    return found


def _load(file: Path, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A tensor, or its rows start:stop, read from the file (the mapping closed again)."""
    try:
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BitnetError(f"{file}: tensor {name} cannot be read ({first_line(e, 120)})") from None


def _checked_packed(name: str, sources: dict, raw: dict, divisor: bool,
                    folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed source's codes, checked (no code 3), and its scale as mean|W|."""
    scale_name = sources[name[:-len("weight")] + "weight_scale"]
    scale = _load(raw[scale_name][0], scale_name).float()
    s = float(scale.reshape(-1)[0]) if scale.numel() == 1 else float("nan")
    s = 1.0 / s if divisor and s != 0 else s
    if not (0 < s < float("inf")):
        raise BitnetError(f"{folder}: {scale_name!r} is {scale.tolist()}, not one positive scale")
    packed = _load(raw[sources[name]][0], sources[name])
    if holds_a_three(packed):
        raise BitnetError(f"{folder}: {sources[name]!r} holds a code of 3; packed ternary codes "
                          "are 0, 1 and 2 (-1, 0, +1 stored as code + 1)")
    return packed, torch.tensor([s], dtype=torch.float32)
