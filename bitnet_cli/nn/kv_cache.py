"""The KV cache of decoding: every layer's keys and values so far, so that each new token costs
one token's worth of work instead of re-running the whole sequence.

It grows with the conversation, not with the model's context: a layer's tensors hold room for a
block of positions at first (BLOCK, or the prompt rounded up to blocks), and double when a token
needs more, up to the context and never past it. A 32k-context model that says 100 tokens holds
256 positions, not 32,768 (gigabytes at 2B4T's shape). Growing copies the filled positions into
the larger tensors; nothing reads past the filled ones, so the logits are those of a cache
preallocated to the whole context (tests/test_kv_cache.py), which `capacity=` still builds.
"""

from __future__ import annotations

import torch

from bitnet_cli.config.settings import ModelConfig


class LayerCache:
    """One layer's keys and values, each (batch, kv_heads, capacity, head_dim); `k, v = layer`
    reads them as the tuple the cache once held."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, limit: int, block: int):
        self.keys, self.values = keys, values
        self.limit, self.block = limit, block

    def __iter__(self):
        return iter((self.keys, self.values))

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def ensure(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values with room for positions 0..length-1 and one more where the
        context allows: a compiled step whose cache is exactly full (its slice of it, all of it,
        contiguous) would compile another graph at every growth."""
        if length > self.capacity or length == self.capacity < self.limit:
            self.grow(grown_capacity(length, self.capacity, self.block, self.limit))
        return self.keys, self.values

    def grow(self, capacity: int) -> None:
        """Larger tensors holding every position of the old ones (the filled ones among them)."""
        old = self.capacity
        shape = (*self.keys.shape[:2], capacity, self.keys.shape[3])
        keys = self.keys.new_zeros(shape)
        values = self.values.new_zeros(shape)
        keys[:, :, :old] = self.keys
        values[:, :, :old] = self.values
        self.keys, self.values = keys, values


def grown_capacity(length: int, capacity: int, block: int, limit: int) -> int:
    """Room for `length` positions and one more: twice the old capacity or length + 1 rounded
    up to blocks, whichever is more (doubling keeps the copies to twice the tokens in all),
    capped at `limit`."""
    if length > limit:
        raise ValueError(f"sequence of {length} tokens is longer than the model's context "
                         f"({limit})")
    wanted = max(2 * capacity, -(-(length + 1) // block) * block)
    return min(wanted, limit)


class KVCache:
    """Keys and values of every layer (`layers`, one LayerCache each), of which the first
    `length` positions are filled. `capacity=n` allocates room for n positions up front (the
    model's whole context: the cache as it was before it grew); by default nothing is allocated
    until the first tokens arrive."""

    BLOCK = 256  # positions a cache grows by at least: a few MB at 2B4T's shape

    def __init__(self, config: ModelConfig, batch_size: int = 1, device=None,
                 dtype: torch.dtype = torch.float32, capacity: int = 0,
                 block: int | None = None):
        limit = config.max_position_embeddings
        if not 0 <= capacity <= limit:
            raise ValueError(f"a cache of {capacity} positions for a context of {limit}")
        shape = (batch_size, config.num_key_value_heads, capacity, config.head_dim)
        block = block or self.BLOCK
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype), limit, block)
                       for _ in range(config.num_hidden_layers)]
        self.length = 0

    @property
    def capacity(self) -> int:
        """The positions every layer has room for."""
        return min(layer.capacity for layer in self.layers)

    def ensure(self, length: int) -> None:
        """Room for positions 0..length-1 in every layer. Called before a step writes them where
        growing must not happen inside it (the fused step's C++, a compiled forward)."""
        for layer in self.layers:
            layer.ensure(length)
