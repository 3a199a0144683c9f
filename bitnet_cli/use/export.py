"""Taking a trained model to the runtimes people already use.

    hf         a transformers folder: config.json (BitNetForCausalLM, quantization_config
               autobitlinear/online), model.safetensors with the latent fp32 weights, which
               transformers quantizes on every forward exactly as training did, and the tokenizer.
    hf-packed  the same folder with every BitLinear weight stored as the released BitNet b1.58
               2B4T checkpoint stores it (autobitlinear/offline): uint8 codes, four per byte
               along the output dimension, and weight_scale = mean|W|, a multiplier after the
               matmul. transformers unpacks the codes once at load, quantizes activations per
               token as bitnet does, multiplies by the codes, then by weight_scale: bitnet's maths
               up to float rounding order. Loads in transformers 4.52-4.57 and 5.13+; 5.0-5.12
               mis-load packed weights.
    gguf       model.gguf for llama.cpp's `bitnet` architecture, tokenizer inside (see write_gguf
               for the tensor types).

A `--quant none` run (the full-precision twin) has no ternary weights: it exports as `hf` only,
without quantization_config, so transformers builds plain linear layers; one without sub-norms
(an imported Llama) as LlamaForCausalLM.
Every export is written into a fresh hidden folder beside OUT and renamed to OUT once complete
(files.atomic_folder), so a failure leaves nothing half-written; an OUT that exists and is not
empty is never touched, and neither is anything else beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from bitnet_cli.nn.bitlinear import CODES_PER_BYTE, pack_ternary, ternary_codes_and_scale
from bitnet_cli.store.checkpoint import model_tensors
from bitnet_cli.errors import BitnetError
from bitnet_cli.store.files import atomic_folder, write_error
from bitnet_cli.use.gguf_writer import write_gguf
from bitnet_cli.use.loading import LoadedModel, load_model, projections, special_tokens
from bitnet_cli.store.runs import TOKENIZER_FILE

FORMATS = ("hf", "hf-packed", "gguf")
LLAMA_CPP_CAVEAT = ("note: only a llama.cpp from 2026 on (upstream commit 38fcfa12) reads this "
                    "model's relu2 FFN from the file; older ones (llama-cpp-python 0.3.36, "
                    "bitnet.cpp, most apps) compute silu(gate) * up and answer wrongly; train "
                    "with --activation silu for models meant for any llama.cpp")


def export_model(selector: str, fmt: str, out: Path) -> tuple[Path, list[str]]:
    """Write the model a RUN|CKPT selector names to the folder `out` in format `fmt`; returns
    the folder and the notes to show (newer checkpoints skipped as damaged, and the llama.cpp
    caveat for a relu2 GGUF)."""
    if fmt not in FORMATS:
        raise BitnetError(f"unknown --format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise BitnetError(f"{out} already exists and is not an empty folder; choose a new --out "
                          "(nothing was written)")
    loaded = load_model(selector, engine="float", latent=True)  # as training left them
    check_exportable(loaded, fmt)
    writer = {"hf": write_hf, "hf-packed": write_hf_packed, "gguf": write_gguf}[fmt]
    if not out.parent.is_dir():
        raise BitnetError(f"--out {out}: the folder {out.parent} does not exist")
    try:
        with atomic_folder(out) as folder:
            writer(loaded, folder)
    except (OSError, SafetensorError) as e:
        raise BitnetError(f"cannot write {out}: {write_error(e)}; "
                          "nothing was written") from None
    caveat = [LLAMA_CPP_CAVEAT] if fmt == "gguf" and loaded.config.activation == "relu2" else []
    if loaded.experiment == "arithmetic":
        caveat.append(ARITHMETIC_FORMAT)
    return out, loaded.skipped + caveat


ARITHMETIC_FORMAT = ("note: the export reads raw text in the format it was trained on: 012+035= "
                     "for 12+35=, and it writes the answer's digits least significant first "
                     "(74; for 47); `bitnet chat` does this formatting for you")


def check_exportable(loaded: LoadedModel, fmt: str) -> None:
    config = loaded.config
    if config.quant != "ternary" and fmt != "hf":
        raise BitnetError(f"{loaded.checkpoint} is a --quant none (full-precision) model: it has "
                          f"no ternary weights to store as {fmt}; --format hf exports it in full "
                          "precision")
    if fmt == "hf-packed":
        for name, module in projections(loaded.model):
            if module.out_features % CODES_PER_BYTE:
                raise BitnetError(
                    f"cannot pack {name}: its {module.out_features} output features are not a "
                    f"multiple of {CODES_PER_BYTE} (the packed layout stores {CODES_PER_BYTE} rows "
                    "per byte); --format hf exports this model")
    if fmt == "gguf" and not config.tie_word_embeddings:
        raise BitnetError("llama.cpp's bitnet graph uses the token embedding as the output layer, "
                          "but this model has its own lm_head; --format hf exports it")


def linear_weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(fp32 latent bytes, hf-packed bytes) of the projection weights: what 2 bits buy.
    Packed: one byte per four codes plus a 4-byte weight_scale per matrix. Reads shapes only,
    so a model built on the meta device will do."""
    latent = packed = 0
    for _, module in projections(model):
        out_features, in_features = module.weight.shape
        latent += out_features * in_features * 4
        packed += out_features // CODES_PER_BYTE * in_features + 4
    return latent, packed


# ---- transformers ----------------------------------------------------------------------------

def write_hf(loaded: LoadedModel, folder: Path) -> None:
    write_hf_folder(loaded, folder, model_tensors(loaded.model), quantization_mode="online")


def write_hf_packed(loaded: LoadedModel, folder: Path) -> None:
    tensors = model_tensors(loaded.model)
    for name, module in projections(loaded.model):
        codes, scale = ternary_codes_and_scale(module.weight.detach())
        tensors[f"{name}.weight"] = pack_ternary(codes)
        tensors[f"{name}.weight_scale"] = scale.reshape(1)  # fp32, as the other float tensors
    write_hf_folder(loaded, folder, tensors, quantization_mode="offline")


def write_hf_folder(loaded: LoadedModel, folder: Path, tensors: dict[str, torch.Tensor],
                    quantization_mode: str) -> None:
    config = loaded.config
    special = special_tokens(loaded)
    ids = {f"{role}_token_id": token_id for role, (_, token_id) in special.items()
           if role in ("bos", "eos", "pad")}  # the ids transformers' configs know
    hf_config = {**hf_model_fields(config), "use_cache": True, "dtype": "float32", **ids}
    if config.quant == "ternary":
        hf_config["quantization_config"] = {
            "quant_method": "bitnet", "linear_class": "autobitlinear",
            "quantization_mode": quantization_mode}
    generation = {"do_sample": False, **ids}
    if "pad_token_id" not in generation and "eos_token_id" in ids:
        generation["pad_token_id"] = ids["eos_token_id"]  # saves transformers a warning per call
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_position_embeddings,
        "add_bos_token": False,  # bitnet's models never saw one: rows start with the data
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        **{f"{role}_token": text for role, (text, _) in special.items()},
    }
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", hf_config)
    write_json(folder / "generation_config.json", generation)
    write_json(folder / "tokenizer_config.json", tokenizer_config)
    shutil.copyfile(loaded.checkpoint / TOKENIZER_FILE, folder / TOKENIZER_FILE)


def hf_model_fields(config) -> dict:
    """config.json's model: BitNetForCausalLM, or LlamaForCausalLM for a model without sub-norms
    (an imported Llama), which transformers computes as bitnet does."""
    llama = not config.sub_norms
    rope = {**(config.rope_scaling or {"rope_type": "default"}), "rope_theta": config.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM" if llama else "BitNetForCausalLM"],
        "model_type": "llama" if llama else "bitnet",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "hidden_act": config.activation,  # transformers' ACT2FN knows both
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "initializer_range": config.initializer_range,
        # transformers' defaults (theta 500000 or 10000, untied) need not be ours: always say
        # them; rope_scaling for transformers 4, which reads no rope_parameters.
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        **({"rope_scaling": config.rope_scaling} if config.rope_scaling else {}),
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        **({"mlp_bias": False, "head_dim": config.head_dim} if llama else {}),
        "attention_dropout": 0.0,
    }


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---- GGUF (llama.cpp) --------------------------------------------------------------------------
