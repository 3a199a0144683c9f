"""The fused decode step: one new token through the whole model in one call into bitnet's
extension (decode_step.cpp), for a model whose projections the 2bit or int8 engine runs.

Its projections are the engines' exact integer sums; the float work around them (norms, RoPE,
attention, the head) is float32 C++ in one fixed order, the same on every kernel path, so its
logits are the same on every CPU (and the 2bit engine's equal the int8 engine's), and they agree
with the per-op path to float rounding (the engines' contract, in the README). A batch of
sequences (a server's, each with its own cache) decodes in one call too, each sequence's logits
those of its step alone, to the bit: the batch shares the reading of the weights, which is what a
lone token waits on.
"""

from __future__ import annotations

import torch

from bitnet_cli.config.settings import ACTIVATIONS
from bitnet_cli.nn.half_head import HalfHead


class FusedDecode:
    """`step(ids, cache)` for one new token (ids of shape (1, 1)), as the model would compute
    it with last_only=True: the logits (1, 1, vocab), the cache extended by one position;
    `step.batch(tokens, caches)` for one new token of each of several sequences."""

    def __init__(self, model, ops, path: int = 0):
        self.ops, self.path = ops, path
        config = model.config
        self.vocab = config.vocab_size
        self.heads, self.eps = config.num_attention_heads, config.rms_norm_eps
        self.gate = ACTIVATIONS.index(config.activation)  # decode_step.cpp's numbering
        self.embed = model.model.embed_tokens.weight.detach()
        self.norms, self.weights, self.scales = [], [], []
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            self.norms += [layer.input_layernorm.weight, attention.attn_sub_norm.weight,
                           layer.post_attention_layernorm.weight, mlp.ffn_sub_norm.weight]
            for linear in (attention.qkv.whole, attention.o_proj, mlp.gate_up.whole,
                           mlp.down_proj):
                self.weights.append(linear.packed if hasattr(linear, "packed") else linear.codes)
                self.scales.append(linear.scale)
        self.row_sums = [row_sums(w) if w.dtype == torch.int8 else torch.empty(0, dtype=torch.int32)
                         for w in self.weights]
        self.norms = [w.detach() for w in self.norms + [model.model.norm.weight]]
        head = model.lm_head
        if isinstance(head, (HalfHead, torch.nn.Linear)):  # float16, or float32 kept as it is
            self.head, self.head_scale = head.weight.detach().contiguous(), torch.empty(0)
            self.head_sums = torch.empty(0, dtype=torch.int32)
        else:
            self.head, self.head_scale = head.codes, head.scale
            self.head_sums = row_sums(head.codes)
        self.cos, self.sin = model.rope_cos, model.rope_sin

    def __call__(self, ids: torch.Tensor, cache, last_only: bool = True) -> torch.Tensor:
        position = cache.length
        cache.ensure(position + 1)  # the C++ writes position in place: room first
        keys = [k for k, _ in cache.layers]
        values = [v for _, v in cache.layers]
        logits = self.ops.decode_step(int(ids[0, -1]), position, *self._model(), keys, values,
                                      *self._settings())
        cache.length += 1
        return logits.view(1, 1, self.vocab)

    def batch(self, tokens: list[int], caches: list) -> torch.Tensor:
        """One new token of each of several sequences, each with its own cache (its own length,
        its own room), in one call that reads the weights once for all of them: the logits
        (len(tokens), vocab), row s what the step gives sequence s alone, to the bit; every cache
        extended by one position."""
        if len(tokens) != len(caches):
            raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
        if len({id(cache) for cache in caches}) != len(caches):
            # Its two tokens would write the same position, each read by the other's attention.
            raise ValueError("one cache twice in a batch")
        positions = [cache.length for cache in caches]
        for cache in caches:
            cache.ensure(cache.length + 1)  # every cache's room before the C++ writes any
        keys = [layer.keys for cache in caches for layer in cache.layers]
        values = [layer.values for cache in caches for layer in cache.layers]
        logits = self.ops.decode_batch([int(token) for token in tokens], positions,
                                       *self._model(), keys, values, *self._settings())
        for cache in caches:
            cache.length += 1
        return logits

    def _model(self) -> tuple:
        """The model's tensors, in the order of the C++ ops' arguments."""
        return (self.embed, self.norms, self.weights, self.row_sums, self.scales, self.head,
                self.head_scale, self.head_sums, self.cos, self.sin)

    def _settings(self) -> tuple:
        return self.heads, self.eps, self.gate, self.path


def row_sums(codes: torch.Tensor) -> torch.Tensor:
    """Each int8 row's sum of codes, in int32, a slice of rows at a time (a sum in int32 widens
    its whole input first: 1.3 GB at 2B4T's head)."""
    return torch.cat([part.sum(1, dtype=torch.int32) for part in codes.split(4096)])
