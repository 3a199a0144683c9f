"""What every bench section shares: the models it times (random weights on a preset's shape),
the interleaved best-of timing, and the machine's memory bandwidth."""

from __future__ import annotations

import time

import torch

from bitnet_cli.config.settings import ModelConfig
from bitnet_cli.nn.model import BitNetForCausalLM
from bitnet_cli.config.presets import PRESETS

PROMPT_TOKENS, NEW_TOKENS = 16, 48  # of every decode measurement


def build(experiment: str, size: str, context: int, quant: str = "ternary") -> BitNetForCausalLM:
    shape = PRESETS[experiment].sizes[size].model
    config = ModelConfig(vocab_size=PRESETS[experiment].vocab_size,
                         max_position_embeddings=context, quant=quant, **shape)
    torch.manual_seed(0)
    return BitNetForCausalLM(config)


def best_of(runs: dict, repeats: int) -> dict:
    """Best wall time of each named function over `repeats` interleaved rounds, after a
    warm-up call of each."""
    for fn in runs.values():
        fn()
    best = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def machine() -> dict:
    """Memory bandwidth as this process sees it: summing (reading) and copying 256 MiB."""
    x = torch.ones(64 * 2**20)
    y = torch.empty_like(x)
    t = best_of({"read": x.sum, "copy": lambda: y.copy_(x)}, 4)
    return {"threads": torch.get_num_threads(), "torch": torch.__version__,
            "read_gb_s": x.nbytes / t["read"] / 1e9, "copy_gb_s": 2 * x.nbytes / t["copy"] / 1e9}
