"""How a reply is sampled: the rules of chat's --temperature, --top-k, --top-p,
--max-new-tokens and --seed, checked before any model is loaded. No torch."""

from __future__ import annotations

import math

from bitnet_cli.config.settings import MAX_SEED
from bitnet_cli.errors import BitnetError

MIN_TEMPERATURE = 1e-3  # anything lower is greedy in effect, and can overflow logits / temperature
TEMPERATURE_RULE = f"0 (greedy) or a number from {MIN_TEMPERATURE} up"


def valid_temperature(value: float) -> bool:
    return value == 0 or MIN_TEMPERATURE <= value < math.inf


def check_sampling(temperature: float | None = None, top_k: int | None = None,
                   top_p: float | None = None, max_new_tokens: int | None = None,
                   seed: int | None = None) -> None:
    """The flags given (None: not given), each in one line if it is bad. Only --top-k's upper
    bound, the model's vocabulary, waits for the model (conversation.Sampling)."""
    if temperature is not None and not valid_temperature(temperature):
        raise BitnetError(f"--temperature must be {TEMPERATURE_RULE}, got {temperature}")
    if top_k is not None and top_k < 1:
        raise BitnetError(f"--top-k must be a whole number from 1 up (at most the model's "
                          f"vocabulary), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise BitnetError(f"--top-p must be above 0 and at most 1, got {top_p}")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise BitnetError(f"--max-new-tokens must be a positive whole number, got {max_new_tokens}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise BitnetError(f"--seed must be a whole number from 0 to {MAX_SEED:,}, got {seed}")
