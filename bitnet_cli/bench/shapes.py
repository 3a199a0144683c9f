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


PROBE_MB, PROBE_PASSES = 1024, 5  # far past any CPU's caches; the best of a few passes


def machine() -> dict:
    """The memory's read bandwidth as the engines can reach it, the yardstick for their GB/s:
    bitnet's kernel reads 1 GiB with its widest loads on every one of torch's threads, best of
    five (torch's own x.sum() reaches only part of it, so an engine could read "faster than
    memory"). Without the kernel, x.sum() is all there is, and the report says so. Copying
    (read + write) is torch's own copy."""
    from bitnet_cli.nn.kernel import ternary_ops
    x = torch.ones(64 * 2**20)
    y = torch.empty_like(x)
    t = best_of({"read": x.sum, "copy": lambda: y.copy_(x)}, 4)
    result = {"threads": torch.get_num_threads(), "torch": torch.__version__,
              "copy_gb_s": 2 * x.nbytes / t["copy"] / 1e9}
    del x, y
    ops, why = ternary_ops()
    if ops is None:
        return {**result, "read_gb_s": 4 * 64 * 2**20 / t["read"] / 1e9,
                "read_probe": f"torch's x.sum() (no kernel: {why})"}
    path = ops.isas()[0]
    return {**result, "read_gb_s": ops.read_bandwidth(PROBE_MB, PROBE_PASSES, path) / 1e9,
            "read_probe": f"bitnet's {ops.path_name(path)} read loop, {PROBE_MB} MiB"}
