"""How a reply is sampled: the rules of chat's --temperature, --top-k, --top-p,
--max-new-tokens and --seed, checked before any model is loaded. No torch."""

from __future__ import annotations

import math

from bitnet_cli.config.numbers import real, whole
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


SAMPLING_KEYS = ("temperature", "top_k", "top_p")  # a model's stored defaults, in that order
# transformers' values for what a generation_config.json that samples leaves unset
SOURCE_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}


def source_sampling(generation: dict, vocab_size: int, where: str) -> dict:
    """How a released model samples, from its generation_config.json, as transformers'
    generate() does by default: {} when it is greedy (no do_sample: true), else its temperature,
    top_k and top_p, with transformers' defaults for those unset and the ones that cut nothing
    (top_k 0, top_p 1) left out. Checked, or one line naming the field."""
    do_sample = generation.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise BitnetError(f"{where}: do_sample must be true or false, got {do_sample!r}")
    if not do_sample:
        return {}  # transformers decodes greedily: its other fields go unused, so unread
    values = {}
    for name, default in SOURCE_DEFAULTS.items():
        value = generation.get(name)
        values[name] = default if value is None else value
    t, k, p = values["temperature"], values["top_k"], values["top_p"]
    if not (real(t) and valid_temperature(t)):
        raise BitnetError(f"{where}: temperature must be {TEMPERATURE_RULE}, got {t!r}")
    if not (whole(k) and k >= 0):
        raise BitnetError(f"{where}: top_k must be a whole number from 0 up, got {k!r}")
    if not (real(p) and 0 < p <= 1):
        raise BitnetError(f"{where}: top_p must be above 0 and at most 1, got {p!r}")
    sampling = {"temperature": float(t)}
    if k > 0:
        sampling["top_k"] = min(k, vocab_size)  # transformers' top-k keeps at most them all
    if p < 1:
        sampling["top_p"] = float(p)
    return sampling


def stored_sampling(data, where: str) -> dict:
    """A model's stored sampling defaults (trainer.json's "sampling": temperature, top_k,
    top_p, each optional), checked: {} when there are none."""
    if data is None:
        return {}
    good = isinstance(data, dict) and set(data) <= set(SAMPLING_KEYS)
    if good:
        t, k, p = (data.get(key) for key in SAMPLING_KEYS)
        good = ((t is None or (real(t) and valid_temperature(t)))
                and (k is None or (whole(k) and k >= 1))
                and (p is None or (real(p) and 0 < p <= 1)))
    if not good:
        raise BitnetError(f"{where}: sampling must hold temperature ({TEMPERATURE_RULE}), "
                          "top_k (from 1) and top_p (above 0, at most 1); restore the file "
                          "from the import's source")
    return {key: data[key] for key in SAMPLING_KEYS if key in data}
