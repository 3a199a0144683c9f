"""model.gguf for llama.cpp's `bitnet` architecture: the tensors renamed to llama.cpp's names,
ternary weights as TQ2_0 blocks (or F16), the tokenizer inside. `gguf` is imported only here,
when this format is asked for."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bitnet_cli.nn.bitlinear import ternary_codes_and_scale
from bitnet_cli.use.loading import PROJECTIONS, LoadedModel, special_tokens

GGUF_FILE = "model.gguf"




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


def write_gguf(loaded: LoadedModel, folder: Path, state=None) -> None:
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

    `state` (the model's state dict by default) may be any mapping that gives each tensor when
    asked: the bench writes a 2B-parameter shape from random codes, one tensor at a time.
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

    state = loaded.model.state_dict() if state is None else state
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
