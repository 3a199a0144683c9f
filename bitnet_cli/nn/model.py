"""The BitNet b1.58 transformer, in the layout of the released 2B4T model.

Parameter names follow transformers' BitNetForCausalLM, so exporting is a plain write:

    model.embed_tokens -> N x [input_layernorm -> self_attn (q,k,v -> RoPE -> SDPA -> attn_sub_norm
    -> o_proj) -> post_attention_layernorm -> mlp (relu(gate)^2 * up -> ffn_sub_norm -> down_proj)]
    -> model.norm -> lm_head (tied to embed_tokens unless configured otherwise)

The FFN's gate is relu(gate)^2 as in 2B4T, or silu(gate) with activation="silu" (llama.cpp's
`bitnet` graph's; a Llama's). An imported full-precision Llama has no sub-norms (sub_norms false).
Every projection is a BitLinear (ternary weights, 8-bit activations); with quant="none" they are
plain nn.Linear, which makes the full-precision twin with identical names and shapes.
The model knows nothing about devices, precision policy or distribution: the trainer decides.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.torch_version import TorchVersion

from bitnet_cli.nn.bitlinear import BitLinear, SharedInput
from bitnet_cli.nn.kv_cache import KVCache, LayerCache
from bitnet_cli.config.settings import ModelConfig


# SDPA shares K/V heads itself from PyTorch 2.5 on, with the same outputs as repeating them;
# F.rms_norm is there from 2.4.
SDPA_SHARES_KV_HEADS = TorchVersion(torch.__version__) >= (2, 5)
FUSED_RMS_NORM = hasattr(F, "rms_norm")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_RMS_NORM and x.dtype == torch.float32 and not torch.is_grad_enabled():
            # Inference: one kernel instead of six, the same floats (tests/test_model.py).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # Computed in float32 whatever the autocast dtype: bf16 sums of squares lose too much.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def make_linear(config: ModelConfig, in_features: int, out_features: int) -> nn.Linear:
    if config.quant == "ternary":
        return BitLinear(in_features, out_features)
    return nn.Linear(in_features, out_features, bias=False)


def sub_norm(config: ModelConfig, dim: int) -> nn.Module:  # nothing in a model without them
    return RMSNorm(dim, config.rms_norm_eps) if config.sub_norms else nn.Identity()


def rope_tables(config: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (seq_len, head_dim), half-split layout: cat(freqs, freqs)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, device=device).float() / dim))
    if config.rope_scaling is not None:
        inv_freq = llama3_frequencies(inv_freq, config.rope_scaling)
    positions = torch.arange(seq_len, device=device).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def llama3_frequencies(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3's RoPE (transformers' llama3 type): wavelengths over context / low_freq_factor
    slowed by `factor`, under context / high_freq_factor kept, the ones between blended."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    slowed = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    blended = (1 - smooth) * slowed / factor + smooth * slowed
    return torch.where((wavelength >= context / high) & (wavelength <= context / low), blended, slowed)


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
        self.qkv = SharedInput(self.q_proj, self.k_proj, self.v_proj)
        self.attn_sub_norm = sub_norm(config, d)
        self.o_proj = make_linear(config, d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, start: int = 0) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if cache is not None:  # keep this step's keys and values, attend over all so far
            k_all, v_all = cache.ensure(start + T)  # grown here unless the caller made room
            k_all[:, :, start:start + T] = k
            v_all[:, :, start:start + T] = v
            k, v = k_all[:, :, :start + T], v_all[:, :, :start + T]
            if start > 0:  # new queries see every cached position and the new ones causally
                causal = False
                mask = torch.ones(T, start + T, dtype=torch.bool, device=x.device).tril(start) \
                    if T > 1 else None
        gqa = {}
        if self.n_kv_heads != self.n_heads:  # grouped-query attention: share each K/V head
            if SDPA_SHARES_KV_HEADS and not torch.is_grad_enabled():
                # No copy of the cache per layer and token. Not in training: its K/V gradients
                # would sum the shared heads in another order, and runs would no longer follow
                # the float path of the runs before them.
                gqa = {"enable_gqa": True}
            else:
                repeats = self.n_heads // self.n_kv_heads
                k = k.repeat_interleave(repeats, dim=1)
                v = v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                           **gqa)
        y = y.transpose(1, 2).reshape(B, T, -1)
        return self.o_proj(self.attn_sub_norm(y))


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


GATES = {"relu2": relu2, "silu": F.silu}  # config.ACTIVATIONS


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        self.gate = GATES[config.activation]
        self.gate_proj = make_linear(config, d, f)
        self.up_proj = make_linear(config, d, f)
        self.gate_up = SharedInput(self.gate_proj, self.up_proj)
        self.ffn_sub_norm = sub_norm(config, f)
        self.down_proj = make_linear(config, f, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x)
        hidden = self.gate(gate) * up
        return self.down_proj(self.ffn_sub_norm(hidden))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None = None, start: int = 0) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, start)
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
        # a model built on the meta device is given its weights: drawing them is slow there
        if isinstance(module, (nn.Linear, nn.Embedding)) and not module.weight.is_meta:
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, cache: "KVCache | None" = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) in float32 for token ids (B, T). With a cache, the ids continue
        the sequence the cache holds, and their keys and values are added to it. With
        `last_only`, the logits of the last position alone (B, 1, vocab): all that decoding
        needs, where a prompt's every position through a 32,000-token head would cost more than
        the rest of the prefill."""
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens is longer than the model's context "
                             f"({self.config.max_position_embeddings})")
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        x = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, start)
        if cache is not None:
            cache.length += T
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x)).float()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())  # parameters() counts a tied weight once


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from a (vocab,) row of logits: greedy at temperature 0, else sampled from
    the temperature-scaled distribution cut to the top k and to the top-p nucleus."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep each token whose preceding mass is below p: the smallest set reaching p.
        keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def generate(model: BitNetForCausalLM, prompt_ids: list[int], max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_ids: tuple[int, ...] = (), use_cache: bool = True,
             generator: torch.Generator | None = None, step=None):
    """Yield new token ids one at a time; stops after a stop id (which is yielded), after
    max_new_tokens, or when the context is full. `step(ids, cache)` runs each new token
    through the model (decoding.DecodeStep); by default the model itself."""
    context = model.config.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    if len(prompt_ids) >= context:
        raise ValueError(f"the prompt is {len(prompt_ids)} tokens; the model's context is {context}")
    device = model.rope_cos.device
    step = step or (lambda ids, cache: model(ids, cache, last_only=True))
    ids = list(prompt_ids)
    cache = KVCache(model.config, device=device) if use_cache else None
    logits = model(torch.tensor([ids], device=device), cache, last_only=True)[0, -1]
    for _ in range(max_new_tokens):
        next_id = sample_next(logits, temperature, top_k, top_p, generator)
        yield next_id
        ids.append(next_id)
        if next_id in stop_ids or len(ids) >= context:
            return
        if cache is not None:
            logits = step(torch.tensor([[next_id]], device=device), cache)[0, -1]
        else:
            logits = model(torch.tensor([ids], device=device), last_only=True)[0, -1]


def evaluation(evaluate):
    """For a task's evaluate(model, ...): run it without gradients and with the model in eval
    mode, then hand the model back in the mode it came in (training goes on after it)."""
    @functools.wraps(evaluate)
    @torch.no_grad()
    def in_eval_mode(task, model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return evaluate(task, model, *args, **kwargs)
        finally:
            model.train(was_training)
    return in_eval_mode
