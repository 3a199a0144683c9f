"""What a source's config.json says about its model, read as transformers reads it and checked:
the layout (its architectures; a config without them is the class transformers builds for its
model_type), the shape, RoPE, the quantization. A field left out (or null) is the layout's
transformers default. What bitnet's model does not compute (biases, RoPE scaled other than
Llama 3's, a head_dim of its own, a near relative of Llama's extras) is refused in one line
that names it. Nothing here reads a file: import_source.py hands the parsed JSON in.
"""

from __future__ import annotations

from pathlib import Path

from bitnet_cli.config.numbers import show, whole
from bitnet_cli.config.rope import LLAMA3_ROPE
from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.errors import BitnetError

LAYOUTS = {"BitNetForCausalLM": "bitnet", "BitnetForCausalLM": "1bitllm",
           "LlamaForCausalLM": "llama"}
READS = ("BitNetForCausalLM (transformers' bitnet), BitnetForCausalLM (1bitLLM) and "
         "LlamaForCausalLM (full precision)")
# A config.json without architectures: AutoModelForCausalLM builds the class of its model_type
# (so a 1bitLLM config must name its BitnetForCausalLM, as the released ones do).
MODEL_TYPES = {"bitnet": "BitNetForCausalLM", "llama": "LlamaForCausalLM"}
# Llama's near relatives, and what each computes that bitnet's model does not.
UNLIKE_LLAMA = {
    "Qwen2ForCausalLM": "biases on q_proj, k_proj and v_proj",
    "Qwen3ForCausalLM": "RMSNorms on the queries and keys (q_norm, k_norm)",
    "MistralForCausalLM": "sliding-window attention",
    "MixtralForCausalLM": "a mixture of experts in place of each FFN",
    "GemmaForCausalLM": "a GELU gate, embeddings scaled by sqrt(hidden_size) and RMSNorm weights "
                        "read as 1 + w",
    "Gemma2ForCausalLM": "logit soft-capping, sliding-window attention and RMSNorms after "
                         "attention and FFN",
    "Gemma3ForCausalLM": "RMSNorms on the queries and keys, sliding-window attention and "
                         "RMSNorms after attention and FFN"}
LLAMA = {"hidden_act": "silu", "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
         "max_position_embeddings": 2048, "tie_word_embeddings": False}  # LlamaConfig's
DEFAULTS = {"bitnet": {"hidden_act": "relu2", "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                       "max_position_embeddings": 2048, "tie_word_embeddings": False},
            "1bitllm": LLAMA, "llama": LLAMA}


def source_layout(hf: dict, folder: Path) -> str:
    """The layout config.json declares, or one line on why it is none that bitnet reads."""
    where, kind = f"{folder}/config.json", hf.get("model_type")
    names = hf.get("architectures") or [MODEL_TYPES.get(kind, kind) if isinstance(kind, str)
                                        else kind]
    name = names[0] if isinstance(names, list) and isinstance(names[0], str) else None
    if name in UNLIKE_LLAMA:
        raise BitnetError(f"{where}: {name} computes {UNLIKE_LLAMA[name]}{_own_head_dim(hf)}, "
                          f"which bitnet's model does not; it imports {READS}")
    if name not in LAYOUTS:
        raise BitnetError(f"{where}: architecture {show(names)} is not one bitnet imports; "
                          f"it reads {READS}")
    return LAYOUTS[name]


def _own_head_dim(hf: dict) -> str:
    """', and head_dim 128 (not hidden_size / num_attention_heads, 64)' where it differs."""
    head_dim, hidden = hf.get("head_dim"), hf.get("hidden_size")
    heads = hf.get("num_attention_heads")
    if whole(head_dim) and whole(hidden) and whole(heads) and heads > 0 \
            and head_dim != hidden // heads:
        return (f", and head_dim {head_dim} (not hidden_size / num_attention_heads, "
                f"{hidden // heads})")
    return ""


def model_config(hf: dict, layout: str, folder: Path) -> ModelConfig:
    """The ModelConfig of the source: a Llama's is full precision without sub-norms."""
    where, defaults = f"{folder}/config.json", DEFAULTS[layout]

    def get(name):
        return hf[name] if hf.get(name) is not None else defaults.get(name)

    act = get("hidden_act")
    if act not in ("relu2", "silu"):
        raise BitnetError(f"{where}: hidden_act {show(act)}; bitnet's models compute relu2 or silu")
    for name, where_ in (("attention_bias", "q/k/v/o_proj"), ("mlp_bias", "gate/up/down_proj")):
        if hf.get(name) is not None and hf[name] is not False:
            raise BitnetError(f"{where}: {name} {show(hf[name])}; bitnet's models have no "
                              f"biases on {where_}")
    heads, kv_heads = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    llama = layout == "llama"
    theta, scaling = _rope(hf, defaults["rope_theta"], where, llama, get("max_position_embeddings"))
    fields = dict(vocab_size=hf.get("vocab_size"), hidden_size=hf.get("hidden_size"),
                  num_hidden_layers=hf.get("num_hidden_layers"), num_attention_heads=heads,
                  num_key_value_heads=heads if kv_heads is None else kv_heads,
                  intermediate_size=hf.get("intermediate_size"),
                  max_position_embeddings=get("max_position_embeddings"), rope_theta=theta,
                  rms_norm_eps=get("rms_norm_eps"),
                  tie_word_embeddings=get("tie_word_embeddings"), activation=act)
    missing = [name for name, value in fields.items() if value is None]
    if missing:
        raise BitnetError(f"{where} has no {missing[0]}")
    try:  # validate checks every field's type and range
        config = ModelConfig(**fields, quant="none" if llama else "ternary", sub_norms=not llama,
                             rope_scaling=scaling)
        config.validate()
    except (BitnetError, TypeError, ValueError) as e:
        raise BitnetError(f"{where}: {e}") from None
    head_dim = hf.get("head_dim")
    if head_dim is not None and not (whole(head_dim) and head_dim == config.head_dim):
        raise BitnetError(f"{where}: head_dim {show(head_dim)} is not hidden_size / "
                          f"num_attention_heads ({config.head_dim}), which bitnet's models use")
    return config


def _rope(hf: dict, default: float, where: str, llama3: bool, context) -> tuple:
    """RoPE's base and scaling as transformers reads them (rope_scaling, where given, in place
    of rope_parameters; the base in them before rope_theta): plain RoPE, or, where `llama3`
    (a Llama's), Llama 3's too. Any other RoPE is refused."""
    rope = {}
    for key in ("rope_parameters", "rope_scaling"):
        given = hf.get(key)
        if given is None:
            continue
        if not isinstance(given, dict):
            raise BitnetError(f"{where}: {key} must be an object (or null), got {show(given)}")
        kind = given.get("rope_type", given.get("type"))
        if kind not in (None, "default") and not (llama3 and kind == "llama3"):
            also = " and Llama 3's (llama3)" if llama3 else ""
            raise BitnetError(f"{where}: {key} has rope_type {show(kind)}; bitnet computes "
                              f"plain RoPE (rope_type default){also}, not other scaled variants")
        if any(isinstance(value, dict) for value in given.values()):
            raise BitnetError(f"{where}: {key} holds RoPE per layer type; bitnet computes one "
                              "plain RoPE for every layer")
        rope = given or rope
    theta = rope.get("rope_theta")
    theta = hf.get("rope_theta") if theta is None else theta
    factor = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if factor is not None and factor != 1:
        raise BitnetError(f"{where}: partial_rotary_factor {show(factor)}; bitnet rotates the "
                          "whole head (factor 1)")
    scaling = None
    if rope.get("rope_type", rope.get("type")) == "llama3":
        # The pretraining context: config.json's own (Phi-3 keeps it there), else the scaling's,
        # else the model's, as transformers takes it.
        found = {name: rope.get(name) for name in LLAMA3_ROPE}
        found["original_max_position_embeddings"] = next(
            (value for value in (hf.get("original_max_position_embeddings"),
                                 rope.get("original_max_position_embeddings"), context)
             if value is not None), None)
        missing = [name for name, value in found.items() if value is None]
        if missing:
            raise BitnetError(f"{where}: rope_type llama3 has no {missing[0]}")
        scaling = {"rope_type": "llama3", **found}
    return default if theta is None else theta, scaling


def quantization(hf: dict, layout: str, folder: Path) -> tuple[str, bool | None]:
    """("online", "offline <class>" or "none" for a full-precision Llama; how a packed
    weight_scale reads: True a divisor, False a multiplier, None where nothing is packed)."""
    where = f"{folder}/config.json"
    q = hf.get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise BitnetError(f"{where}: quantization_config must be an object, got {show(q)}")
    q = q or {}
    if layout == "1bitllm":
        return "online", None
    if layout == "llama":
        if q:
            raise BitnetError(f"{where}: quantization {show(q.get('quant_method'))}; bitnet "
                              "imports a Llama's full-precision weights, not quantized ones")
        return "none", None
    if q and q.get("quant_method") != "bitnet":
        raise BitnetError(f"{where}: quantization {show(q.get('quant_method'))} is not BitNet's")
    mode = q.get("quantization_mode", "offline" if q else "online")
    linear = q.get("linear_class", "bitlinear")
    if mode not in ("online", "offline") or linear not in ("bitlinear", "autobitlinear"):
        raise BitnetError(f"{where}: quantization_config {show(mode)}/{show(linear)} is not "
                          "online or offline, bitlinear or autobitlinear")
    norm = q.get("use_rms_norm")
    if norm is not None and norm is not False:
        raise BitnetError(f"{where}: quantization_config.use_rms_norm {show(norm)}; bitnet reads "
                          "false only: true gives each of transformers' BitLinear layers an "
                          "RMSNorm of its own on its input before quantizing it, which bitnet's "
                          "models do not compute")
    skipped = q.get("modules_to_not_convert")
    if skipped is not None and not (isinstance(skipped, list)
                                    and all(name == "lm_head" for name in skipped)):
        raise BitnetError(f"{where}: quantization_config.modules_to_not_convert {show(skipped)}; "
                          "bitnet quantizes every projection (only lm_head stays float)")
    if mode == "online":
        return "online", None
    return f"offline {linear}", linear == "bitlinear"
