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
without quantization_config, so transformers builds plain linear layers.
Every export is written into a fresh hidden folder beside OUT and renamed to OUT once complete
(files.atomic_folder), so a failure leaves nothing half-written; an OUT that exists and is not
empty is never touched, and neither is anything else beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from bitnet_cli.nn.bitlinear import CODES_PER_BYTE, pack_ternary, ternary_codes_and_scale
from bitnet_cli.store.checkpoint import model_tensors
from bitnet_cli.errors import BitnetError
from bitnet_cli.tasks import load_experiment
from bitnet_cli.store.files import atomic_folder, write_error
from bitnet_cli.use.loading import LoadedModel, load_model
from bitnet_cli.store.runs import TOKENIZER_FILE

FORMATS = ("hf", "hf-packed", "gguf")
GGUF_FILE = "model.gguf"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


LLAMA_CPP_CAVEAT = ("note: today's llama.cpp computes silu(gate) * up for the bitnet "
                    "architecture, not this model's relu2 FFN, so its answers will be wrong there; "
                    "train with --activation silu for models meant for llama.cpp")


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
    loaded = load_model(selector, engine="float")  # the latent weights, as training left them
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
        raise BitnetError(f"{loaded.checkpoint} was trained with --quant none: it has no ternary "
                          f"weights to store as {fmt}; --format hf exports it in full precision")
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


def projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(state-dict prefix, module) of every BitLinear (or twin nn.Linear) in the layers."""
    return [(f"model.layers.{i}.{p}", layer.get_submodule(p))
            for i, layer in enumerate(model.model.layers) for p in PROJECTIONS]


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
    hf_config = {
        "architectures": ["BitNetForCausalLM"],
        "model_type": "bitnet",
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
        # transformers' defaults (theta 500000, untied) need not be ours: always say both.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_word_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": "float32",
        **ids,
    }
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


def special_tokens(loaded: LoadedModel) -> dict[str, tuple[str, int]]:
    """role -> (token text, id) for the roles the tokenizer can fill. The experiment's stop token
    (';' ends an answer, <|endoftext|> a story) is eos, and also bos as in GPT-2: the token that
    separates one document from the next in training; <pad> and <unk> where the vocabulary has
    them."""
    tokenizer = loaded.tokenizer
    task = load_experiment(loaded.experiment)
    stops = task.stop_ids(tokenizer) if hasattr(task, "stop_ids") else ()
    found = {}
    if stops:
        found["eos"] = found["bos"] = (tokenizer.id_to_token(stops[0]), stops[0])
    for role, text in (("pad", "<pad>"), ("unk", "<unk>")):
        if tokenizer.token_to_id(text) is not None:
            found[role] = (text, tokenizer.token_to_id(text))
    return found


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


# ---- GGUF (llama.cpp) --------------------------------------------------------------------------

GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.attn_sub_norm": "attn_sub_norm",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.ffn_sub_norm": "ffn_sub_norm",
    "mlp.down_proj": "ffn_down",
}
TERNARY_BLOCK = 256  # QK_K: a TQ2_0 block holds 256 codes of one row and one f16 scale


def write_gguf(loaded: LoadedModel, folder: Path) -> None:
    """model.gguf for llama.cpp's `bitnet` architecture: NEOX rope, which is our half-split
    layout, so q and k need no permuting; relu2 declared as bitnet.hidden_activation (llama.cpp
    does not know that value yet and runs SiLU instead: see the README).

    Each BitLinear weight is stored as its codes in {-1, 0, 1} with a unit scale per block, plus
    a separate F32 tensor `blk.N.<name>.scale` holding mean|W|, which llama.cpp's bitnet graph
    multiplies in after the matmul. Decoding therefore gives back the codes exactly, and codes *
    scale == bitnet's ternary weight exactly; folding mean|W| into the blocks' f16 scales, as
    llama.cpp's own converter does, would round it. The codes are TQ2_0 (2.0625 bits per weight)
    where the row length (in features) is a multiple of 256, and F16 otherwise (F16 holds -1, 0
    and 1 exactly). The token embedding, which is also the output layer and read whole for every
    token, is F16: half the bytes of F32, and the same float16 head bitnet's int8 engine decodes
    with (Q8_0 would quantize the hidden state per 32 values as well). Norms stay F32.
    llama.cpp quantizes activations its own way (per 256-block for TQ2_0, not at all for F16),
    so its logits are close to bitnet's, not identical.
    """
    import gguf  # here, not at the top: only this format needs it

    config = loaded.config
    writer = gguf.GGUFWriter(str(folder / GGUF_FILE), "bitnet")
    writer.add_name(loaded.checkpoint.parent.parent.name)  # the run: RUN/checkpoints/step_N
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_string("bitnet.hidden_activation", config.activation)
    add_gguf_tokenizer(writer, loaded, gguf)

    state = loaded.model.state_dict()
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].half().numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    tq2_0, any_tq2_0 = gguf.GGMLQuantizationType.TQ2_0, False
    for i in range(config.num_hidden_layers):
        for ours, theirs in GGUF_LAYER_NAMES.items():
            weight, name = state[f"model.layers.{i}.{ours}.weight"], f"blk.{i}.{theirs}"
            if ours not in PROJECTIONS:
                writer.add_tensor(f"{name}.weight", weight.numpy())
                continue
            codes, scale = ternary_codes_and_scale(weight)
            codes = codes.float().numpy()
            if codes.shape[1] % TERNARY_BLOCK == 0:
                writer.add_tensor(f"{name}.weight", gguf.quants.quantize(codes, tq2_0),
                                  raw_dtype=tq2_0)
                any_tq2_0 = True
            else:
                writer.add_tensor(f"{name}.weight", codes.astype(np.float16))
            writer.add_tensor(f"{name}.scale", scale.reshape(1).numpy())
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0 if any_tq2_0 else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def add_gguf_tokenizer(writer, loaded: LoadedModel, gguf) -> None:
    """The vocabulary as a GPT-2 style BPE, which llama.cpp runs itself. bitnet's text tokenizers
    are byte-level BPE with GPT-2's split rule; its character tokenizers (simple, arithmetic,
    tictactoe) are BPE without merges over printable ASCII, which the byte-level mapping leaves
    as they are."""
    tokenizer = loaded.tokenizer
    spec = json.loads(tokenizer.to_str())
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    tokens, types = [], []
    for token_id in range(loaded.config.vocab_size):
        text = tokenizer.id_to_token(token_id)
        if text is None:  # the model's vocabulary may be larger than the tokenizer's
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.CONTROL if text in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        # llama.cpp requires the merges key and gguf cannot store an empty list: one merge of
        # two special tokens, which BPE never sees side by side in text, changes nothing.
        merges = [" ".join(sorted(special)[:2])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for role, (_, token_id) in special_tokens(loaded).items():
        getattr(writer, f"add_{role}_token_id")(token_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
