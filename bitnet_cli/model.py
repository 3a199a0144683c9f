"""The BitNet b1.58 transformer, in the layout of the released 2B4T model.

Parameter names follow transformers' BitNetForCausalLM, so exporting is a plain write:

    model.embed_tokens -> N x [input_layernorm -> self_attn (q,k,v -> RoPE -> SDPA -> attn_sub_norm
    -> o_proj) -> post_attention_layernorm -> mlp (relu(gate)^2 * up -> ffn_sub_norm -> down_proj)]
    -> model.norm -> lm_head (tied to embed_tokens unless configured otherwise)

Every projection is a BitLinear (ternary weights, 8-bit activations); with quant="none" they are
plain nn.Linear, which makes the full-precision twin with identical names and shapes.
The model knows nothing about devices, precision policy or distribution: the trainer decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bitnet_cli.bitlinear import BitLinear
from bitnet_cli.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in float32 whatever the autocast dtype: bf16 sums of squares lose too much.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_linear(config: ModelConfig, in_features: int, out_features: int) -> nn.Linear:
    if config.quant == "ternary":
        return BitLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)


def rope_tables(config: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), half-split layout: cat(freqs, freqs)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
        self.q_proj = make_linear(config, d, d)
        self.k_proj = make_linear(config, d, kv)
        self.v_proj = make_linear(config, d, kv)
        self.attn_sub_norm = RMSNorm(d, config.rms_norm_eps)
        self.o_proj = make_linear(config, d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each K/V head
            repeats = self.n_heads // self.n_kv_heads
            k = k.repeat_interleave(repeats, dim=1)
            v = v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(self.attn_sub_norm(y))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate_proj = make_linear(config, d, f)
        self.up_proj = make_linear(config, d, f)
        self.ffn_sub_norm = RMSNorm(f, config.rms_norm_eps)
        self.down_proj = make_linear(config, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.gate_proj(x)).square() * self.up_proj(x)
        return self.down_proj(self.ffn_sub_norm(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.` prefix of the state dict: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class BitNetForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config, config.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for token ids (B, T)."""
        T = input_ids.shape[1]
        if T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {T} tokens is longer than the model's context "
                             f"({self.config.max_position_embeddings})")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once
