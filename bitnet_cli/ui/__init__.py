"""Rich lives here and only here: the live training view (live.py), tables (tables.py, bench.py),
charts (charts.py). Output goes to stderr, so stdout stays clean for `--json` and for piping; the
console objects and the number formats every part shares are in this module."""

from __future__ import annotations

import math

from rich.console import Console

stderr = Console(stderr=True)
stdout = Console()

def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "-:--:--"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"  # as Rich's elapsed column: h:mm:ss


def format_rate(tokens_per_s: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if tokens_per_s >= scale:
            return f"{tokens_per_s / scale:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


def format_eval(row: dict, headline: str) -> str:
    """An eval row in one line; a value that is absent or not a number shows as '-'."""
    parts = [f"loss {number(row.get('loss'), '.4f')}"]
    if headline != "loss" and headline in row:
        parts.append(f"{headline} {number(row[headline], '.1%')}")
    if "unigram_loss" in row:
        parts.append(f"(unigram baseline {number(row['unigram_loss'], '.4f')})")
    groups = [f"{k.split('/', 1)[1]} {number(v, '.0%')}" for k, v in row.items()
              if k.startswith(f"{headline}/")]
    if groups:
        parts.append("(" + ", ".join(groups) + ")")
    return " ".join(parts)


def number(value, fmt: str) -> str:
    """A number in `fmt`; anything else (absent, damaged) as '-'. A share short of 1 never shows
    as 100% (552 lines of 553 unbeaten is 99.8%, or 99% with no decimals, not 100%)."""
    from bitnet_cli.config.numbers import real
    if not real(value):
        return "-"
    text = format(value, fmt)
    if fmt.endswith("%") and value < 1 and text.startswith("100"):
        decimals = int(fmt[1:-1] or 6)
        text = format(math.floor(value * 10 ** (decimals + 2)) / 10 ** (decimals + 2), fmt)
    return text


def count(n) -> str:
    """A parameter or token count as 3.2M; anything else as '-'."""
    from bitnet_cli.config.numbers import format_count
    return format_count(n) if isinstance(n, (int, float)) else "-"
