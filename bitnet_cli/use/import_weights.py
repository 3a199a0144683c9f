"""A released checkpoint's tensors as bitnet's model holds them: renamed to its state dict,
checked against the shapes the config declares, and float32 latent weights for the ternary
projections, packed codes included (see importing.py). Read from safetensors only, a tensor at
a time."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError, first_line
from bitnet_cli.nn.bitlinear import CODES_PER_BYTE
from bitnet_cli.nn.model import BitNetForCausalLM

RENAMED = {"1bitllm": {".self_attn.inner_attn_ln.": ".self_attn.attn_sub_norm.",
                       ".mlp.ffn_layernorm.": ".mlp.ffn_sub_norm."}}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a cache some exports keep: recomputed here
FLOAT_NAMES = ("F32", "F16", "BF16")  # as safetensors headers name them


class LatentTensors(Mapping):
    """Every tensor the model needs, by its name in bitnet's model: float32, made when asked
    (one at a time, so a 2B model is never whole in memory). The names, shapes and dtypes are
    checked when this is made, from the files' headers; `divisor`: a packed weight_scale is
    1/mean|W| (transformers' bitlinear) rather than mean|W|."""

    def __init__(self, folder: Path, config: ModelConfig, layout: str, divisor: bool):
        self.folder, self.divisor = folder, divisor
        self.raw = _safetensors(folder)
        with torch.device("meta"):
            model = BitNetForCausalLM(config)
        self.shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        if config.tie_word_embeddings:
            self.shapes.pop("lm_head.weight")
        self.sources = _sources(self.raw, layout, config.tie_word_embeddings)
        unexpected = sorted(set(self.sources) - set(self.shapes)
                            - {n for n in self.sources if n.endswith(".weight_scale")})
        if unexpected:
            raise BitnetError(f"{folder}: unexpected tensor {self.sources[unexpected[0]]!r} for "
                              "the architecture config.json declares")
        for name, shape in self.shapes.items():
            self._check(name, shape)

    def _check(self, name: str, shape: tuple) -> None:
        if name not in self.sources:
            raise BitnetError(f"{self.folder}: tensor {name!r} is missing")
        theirs = self.sources[name]
        _, dtype, stored = self.raw[theirs]
        if dtype == "U8":  # packed ternary codes
            out_features, in_features = shape if len(shape) == 2 else (0, 0)
            if not name.endswith("_proj.weight") or stored != (out_features // CODES_PER_BYTE,
                                                               in_features):
                raise BitnetError(f"{self.folder}: tensor {theirs!r} is uint8 of shape "
                                  f"{list(stored)}; packed codes of this tensor would be "
                                  f"{[out_features // CODES_PER_BYTE, in_features]}")
            scale = name[:-len("weight")] + "weight_scale"
            if scale not in self.sources:
                raise BitnetError(f"{self.folder}: packed {theirs!r} has no {scale!r}")
            if self.raw[self.sources[scale]][1] not in FLOAT_NAMES:
                raise BitnetError(f"{self.folder}: {self.sources[scale]!r} must be a float")
            return
        if stored != shape:
            raise BitnetError(f"{self.folder}: tensor {theirs!r} has shape {list(stored)}, the "
                              f"config says {list(shape)}")
        if dtype not in FLOAT_NAMES:
            raise BitnetError(f"{self.folder}: tensor {theirs!r} is {dtype}; weights must be "
                              "F32, F16 or BF16 (or U8 packed codes)")

    def __getitem__(self, name: str) -> torch.Tensor:
        theirs = self.sources[name]
        file, dtype, _ = self.raw[theirs]
        if dtype == "U8":
            return _from_packed(name, self.sources, self.raw, self.shapes[name], self.divisor,
                                self.folder)
        return _load(file, theirs).float()

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


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


def _load(file: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BitnetError(f"{file}: tensor {name} cannot be read ({first_line(e, 120)})") from None


def _from_packed(name: str, sources: dict, raw: dict, shape: tuple, divisor: bool,
                 folder: Path) -> torch.Tensor:
    """A packed projection's latent weights: codes * s / p (see importing.py), its shapes
    already checked (LatentTensors._check)."""
    scale_name = sources[name[:-len("weight")] + "weight_scale"]
    scale = _load(raw[scale_name][0], scale_name).float()
    s = float(scale.reshape(-1)[0]) if scale.numel() == 1 else float("nan")
    s = 1.0 / s if divisor and s != 0 else s
    if not (0 < s < float("inf")):
        raise BitnetError(f"{folder}: {scale_name!r} is {scale.tolist()}, not one positive scale")
    packed = _load(raw[sources[name]][0], sources[name])
    stored_codes = torch.stack([(packed >> (2 * b)) & 3 for b in range(CODES_PER_BYTE)])
    if (stored_codes == 3).any():
        raise BitnetError(f"{folder}: {sources[name]!r} holds a code of 3; packed ternary codes "
                          "are 0, 1 and 2 (-1, 0, +1 stored as code + 1)")
    codes = stored_codes.reshape(shape).float() - 1
    nonzero = codes.abs().mean()
    return codes * (s / nonzero) if nonzero > 0 else codes
