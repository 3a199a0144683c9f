"""A released checkpoint's tensors as bitnet's model holds them: renamed to its state dict,
checked against the shapes the config declares, and float32 latent weights for the ternary
projections, packed codes included (see importing.py). Read from safetensors only, a tensor at
a time."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError
from bitnet_cli.nn.bitlinear import CODES_PER_BYTE
from bitnet_cli.nn.model import BitNetForCausalLM

RENAMED = {"1bitllm": {".self_attn.inner_attn_ln.": ".self_attn.attn_sub_norm.",
                       ".mlp.ffn_layernorm.": ".mlp.ffn_sub_norm."}}
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")  # a cache some exports keep: recomputed here
FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def latent_tensors(folder: Path, config: ModelConfig, layout: str,
                   divisor: bool) -> dict[str, torch.Tensor]:
    """Every tensor the model needs, float32, by its name in bitnet's model; `divisor`: a
    packed weight_scale is 1/mean|W| (transformers' bitlinear) rather than mean|W|."""
    return _our_tensors(_safetensors(folder), config, layout, divisor, folder)


def _safetensors(folder: Path) -> dict:
    """name -> (file, dtype, shape) of every tensor in the folder's safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickles:
            raise BitnetError(f"{folder} holds its weights only as {pickles[0]}, a pickle file, "
                              "which bitnet never loads; convert it to safetensors first")
        raise BitnetError(f"{folder} has no .safetensors weights")
    found = {}
    for file in files:
        try:
            with safe_open(str(file), "pt") as f:
                for name in f.keys():
                    part = f.get_slice(name)
                    found[name] = (file, part.get_dtype(), tuple(part.get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise BitnetError(f"{file} cannot be read ({str(e)[:120]})") from None
    return found


def _load(file: Path, name: str) -> torch.Tensor:
    try:
        with safe_open(str(file), "pt") as f:
            return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise BitnetError(f"{file}: tensor {name} cannot be read ({str(e)[:120]})") from None


def _our_tensors(raw: dict, config: ModelConfig, layout: str, divisor: bool,
                 folder: Path) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in BitNetForCausalLM(config).state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    renames = RENAMED.get(layout, {})

    def ours(name: str) -> str:
        for theirs, mine in renames.items():
            name = name.replace(theirs, mine)
        return name
    sources = {ours(name): name for name in raw if not IGNORED.match(name)}
    if config.tie_word_embeddings:
        sources.pop("lm_head.weight", None)  # a tied head some writers store twice
    scales = {name for name in sources if name.endswith(".weight_scale")}
    unexpected = sorted(set(sources) - set(expected) - scales)
    if unexpected:
        raise BitnetError(f"{folder}: unexpected tensor {sources[unexpected[0]]!r} for the "
                          "architecture config.json declares")
    tensors = {}
    for name, shape in expected.items():
        if name not in sources:
            raise BitnetError(f"{folder}: tensor {name!r} is missing")
        file, dtype, stored = raw[sources[name]]
        packed = dtype == "U8"
        if packed:
            tensors[name] = _from_packed(name, sources, raw, shape, divisor, folder)
            continue
        if stored != shape:
            raise BitnetError(f"{folder}: tensor {sources[name]!r} has shape {list(stored)}, the "
                              f"config says {list(shape)}")
        tensor = _load(file, sources[name])
        if tensor.dtype not in FLOATS:
            raise BitnetError(f"{folder}: tensor {sources[name]!r} is {tensor.dtype}; weights "
                              "must be float32, float16 or bfloat16 (or uint8 packed codes)")
        tensors[name] = tensor.float()
    return tensors


def _from_packed(name: str, sources: dict, raw: dict, shape: tuple, divisor: bool,
                 folder: Path) -> torch.Tensor:
    """A packed projection's latent weights: codes * s / p (see the module's docstring)."""
    out_features, in_features = shape
    file, _, stored = raw[sources[name]]
    if not name.endswith("_proj.weight") or stored != (out_features // CODES_PER_BYTE,
                                                       in_features):
        raise BitnetError(f"{folder}: tensor {sources[name]!r} is uint8 of shape {list(stored)}; "
                          f"packed codes of a {out_features}x{in_features} projection are "
                          f"{[out_features // CODES_PER_BYTE, in_features]}")
    scale_name = name[:-len("weight")] + "weight_scale"
    if scale_name not in sources:
        raise BitnetError(f"{folder}: packed {sources[name]!r} has no {scale_name!r}")
    scale = _load(*raw[sources[scale_name]][:1], sources[scale_name])
    if scale.numel() != 1 or scale.dtype not in FLOATS:
        raise BitnetError(f"{folder}: {sources[scale_name]!r} must be one float")
    s = float(scale.float())
    s = 1.0 / s if divisor else s
    if not (s > 0 and s < float("inf")):
        raise BitnetError(f"{folder}: {sources[scale_name]!r} is {float(scale.float())}, not a "
                          "positive scale")
    packed = _load(file, sources[name])
    stored_codes = torch.stack([(packed >> (2 * b)) & 3 for b in range(CODES_PER_BYTE)])
    if (stored_codes == 3).any():
        raise BitnetError(f"{folder}: {sources[name]!r} holds a code of 3; packed ternary codes "
                          "are 0, 1 and 2 (-1, 0, +1 stored as code + 1)")
    codes = stored_codes.reshape(out_features, in_features).float() - 1
    nonzero = codes.abs().mean()
    return codes * (s / nonzero) if nonzero > 0 else codes
