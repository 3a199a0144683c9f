"""Numbers as a user writes them and as an error quotes them: sizes like 95M, counts like
12.3M, and the checks every config field and JSON file uses. No torch here."""

from __future__ import annotations

import math
import re

from bitnet_cli.errors import BitnetError

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}


def parse_size(text: str) -> int:
    """'95M' -> 95_000_000, '1.3B' -> 1_300_000_000, '500k' -> 500_000, '1234' -> 1234."""
    match = _SIZE_RE.match(str(text))
    if not match:
        raise BitnetError(f"cannot read {text!r} as a size; write a number with an optional "
                          "k, M, B or T suffix, like 500k, 95M or 1.3B")
    value = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
    if value <= 0:
        raise BitnetError(f"size must be positive, got {text!r}")
    return int(round(value))


def format_count(n: float) -> str:
    """12_345_678 -> '12.3M'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.3g}"


def whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_whole(name: str, value, low: int, high: int) -> None:
    if not whole(value) or not low <= value <= high:
        raise BitnetError(f"{name} must be a whole number from {low:,} to {high:,}, "
                          f"got {show(value)}")


def show(value) -> str:
    """A value as an error message quotes it: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
