"""How each new token is decoded: fused (fused_decode.py: one call into bitnet's extension for a
model whose projections the 2bit or int8 engine runs), compiled or per-op (DecodeStep).

Eager PyTorch spends a token of the 95M model on some 400 small ops; dispatching them costs more
than the matmuls (a profile: 1.4 ms of ternary sums, 1.3 ms of head, 3 ms of everything else).
The fused step does the same maths in C++ in one pass: the projections are the engines' exact
integer sums, the float work around them (norms, RoPE, attention, the head) is float32 in its own
order, so its logits match the per-op path's to float rounding (and the 2bit engine's equal the
int8 engine's exactly). The prompt's pass stays the per-op path: it is one call for many tokens.
"""

from __future__ import annotations

import torch

from bitnet_cli.nn.compiled import compile_failure, compiler_problem, use_bitnet_cache
from bitnet_cli.nn.fused_decode import FusedDecode
from bitnet_cli.nn.half_head import HalfHead
from bitnet_cli.nn.int8 import Int8Linear, Int8SharedInput
from bitnet_cli.nn.kernel import ternary_ops
from bitnet_cli.nn.packed import ENGINE_LINEARS

def fused_decode(model, path: int = 0) -> FusedDecode | None:
    """The fused step for `model`, or None where it cannot run it: a model not on the CPU, not
    converted by the 2bit or int8 engine, or no extension here (the per-op path decodes then)."""
    if model.rope_cos.device.type != "cpu":
        return None
    layers = model.model.layers
    converted = all(isinstance(layer.self_attn.qkv, Int8SharedInput)
                    and isinstance(layer.mlp.gate_up, Int8SharedInput)
                    and isinstance(layer.self_attn.o_proj, ENGINE_LINEARS)
                    and isinstance(layer.mlp.down_proj, ENGINE_LINEARS) for layer in layers)
    if not converted or not isinstance(model.lm_head, (HalfHead, Int8Linear, torch.nn.Linear)):
        return None
    ops, _ = ternary_ops()
    return FusedDecode(model, ops, path) if ops is not None else None


class DecodeStep:
    """The one-token forward that decoding repeats: fused, compiled (`chat --compile`) or eager.

    A model the 2bit or int8 engine runs on a CPU decodes through the fused step (FusedDecode):
    one call into bitnet's extension per token, 2-5x faster than the per-op path and faster
    than compiling it, so it is used even when compiling was asked for. Elsewhere (the float
    engine, GPUs, no extension) the model itself runs, or compiled with dynamic shapes, one graph
    for every cache length: a small model ~2.7x faster so, a 95M one ~1.3x, for 4-17 s of
    compiling the first time, a few from inductor's cache. If compiling fails, one line through
    `notice`, and the step runs eagerly from then on; nothing of the failed call has touched the
    cache (the compiler works on stand-in tensors until it has a graph to run). `fused=False`
    keeps the per-op path (the bench compares the two)."""

    def __init__(self, model: torch.nn.Module, compile: bool, notice=lambda line: None,
                 fused: bool = True):
        self.model, self.notice = model, notice
        self.forward = (fused and fused_decode(model)) or model
        self.fused = isinstance(self.forward, FusedDecode)
        if compile and not self.fused:
            problem = compiler_problem(model.rope_cos.device)
            if problem:
                notice(f"{problem}; decoding eagerly")
            else:
                use_bitnet_cache()
                # Every model instance is a new entry under the same forward code, and past
                # eight of them the compiler quietly runs eagerly: start from a clean slate
                # (a process decodes one model at a time; the bench builds many).
                torch._dynamo.reset()
                self.forward = torch.compile(model, dynamic=True)
        self.settled = self.fused or self.forward is model  # nothing left to compile

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile now, on a scratch cache (a few positions in, past the lengths 0 and 1 that
        the compiler treats as special), so that no reply's speed includes the compiling."""
        from bitnet_cli.nn.model import KVCache
        if self.settled:
            return
        device = self.model.rope_cos.device
        cache = KVCache(self.model.config, device=device)
        self.model(torch.zeros(1, 2, dtype=torch.long, device=device), cache)
        for _ in range(2):
            self(torch.zeros(1, 1, dtype=torch.long, device=device), cache)

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        # Growing inside a compiled forward would break its graph: make room out here.
        cache.ensure(cache.length + ids.shape[1])
        try:
            logits = self.forward(ids, cache, last_only=True)
        except Exception as e:  # whatever the compiler raised: go on without it
            if self.settled:
                raise
            self.notice(f"{compile_failure(e)}; decoding eagerly")
            self.forward = self.model
            logits = self.forward(ids, cache, last_only=True)
        self.settled = True
        return logits

    def batch(self, tokens: list[int], caches: list) -> torch.Tensor:
        """One new token of each of several sequences, each with its own cache: the logits
        (len(tokens), vocab), row s those of sequence s decoded alone. Fused: one call for the
        batch (FusedDecode.batch); otherwise each sequence's own step, one after another."""
        if self.fused:
            return self.forward.batch(tokens, caches)
        if len(tokens) != len(caches):
            raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
        device = self.model.rope_cos.device
        return torch.cat([self(torch.tensor([[token]], device=device), cache)[0]
                          for token, cache in zip(tokens, caches)])
