"""RoPE scaling the model computes: Llama 3's (nn/model.py llama3_frequencies), checked as a
config field. No torch: status reads configs through this."""

from __future__ import annotations

from bitnet_cli.config.numbers import real, show
from bitnet_cli.errors import BitnetError

LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def check_rope_scaling(scaling) -> None:
    """Llama 3's scaling, the one kind the model computes: rope_type "llama3" and its numbers."""
    if not (isinstance(scaling, dict) and scaling.get("rope_type") == "llama3"
            and set(scaling) == {"rope_type", *LLAMA3_ROPE}):
        raise BitnetError(f"rope_scaling must be Llama 3's (rope_type llama3 with "
                          f"{', '.join(LLAMA3_ROPE)}), got {show(scaling)}")
    for name in LLAMA3_ROPE:
        if not real(scaling[name]) or scaling[name] <= 0:
            raise BitnetError(f"rope_scaling's {name} must be a positive number, got "
                              f"{show(scaling[name])}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise BitnetError("rope_scaling's high_freq_factor must be above its low_freq_factor")
