"""Side-by-side measurements in one process, ratios first. Speed claims are shown here, never
asserted by timed tests.

    decode   greedy generation with the KV cache vs re-running the whole sequence per token
"""

from __future__ import annotations

import time

import torch

from bitnet_cli.config import PRESETS, ModelConfig
from bitnet_cli.model import BitNetForCausalLM, generate

PROMPT_TOKENS, NEW_TOKENS = 32, 256


def _timed(fn, repeats: int = 2) -> tuple[float, object]:
    """Best wall time of `repeats` runs after one warm-up run, and the last result."""
    result = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def decode_kv_cache(experiment: str = "tinystories", size: str = "12M") -> dict:
    """Tokens/s of greedy decoding with and without the KV cache on a preset's shape."""
    shape = PRESETS[experiment]["sizes"][size]["model"]
    config = ModelConfig(vocab_size=PRESETS[experiment]["vocab_size"],
                         max_position_embeddings=PROMPT_TOKENS + NEW_TOKENS, **shape)
    torch.manual_seed(0)
    model = BitNetForCausalLM(config).eval()
    prompt = torch.randint(0, config.vocab_size, (PROMPT_TOKENS,)).tolist()
    with_cache, tokens = _timed(lambda: list(generate(model, prompt, NEW_TOKENS)))
    without, plain = _timed(lambda: list(generate(model, prompt, NEW_TOKENS, use_cache=False)), 1)
    return {
        "name": f"decode {NEW_TOKENS} tokens, {experiment} {size} shape, fp32, prompt {PROMPT_TOKENS}",
        "params": model.num_params(),
        "kv_cache_tok_per_s": NEW_TOKENS / with_cache,
        "no_cache_tok_per_s": NEW_TOKENS / without,
        "speedup": without / with_cache,
        # Random weights give near-tied logits, where float rounding can pick either token;
        # a trained model's greedy output is identical (tests/test_text.py checks that).
        "identical_prefix": next((i for i, (a, b) in enumerate(zip(tokens, plain)) if a != b),
                                 len(tokens)),
        "threads": torch.get_num_threads(),
    }


def run_all() -> list[dict]:
    return [decode_kv_cache()]
