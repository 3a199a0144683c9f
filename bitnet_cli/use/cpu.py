"""How many CPU cores are free right now: the thread count for decoding beside other work.

Decoding a token runs a few dozen small parallel regions, and each waits at its end for its
slowest thread. When another process keeps the cores busy (a training run beside a chat), the
OS deschedules one of our threads now and then, every region waits for it, and two threads on
two shared cores decode 3-5x slower than one (measured at 95M: 40-73 tok/s against 80-110).
So before each reply, `decode_threads` samples how idle each core of ours was over a tenth of a
second (/proc/stat) and decodes with as many threads as there are idle cores, at least one, at
most the thread count PyTorch started with. A core busy only with niced work counts as idle:
a CPU training run lowers itself to nice 19 (training/setup.py), and beside it a chat's threads
get the cores first, so it decodes at its quiet speed. Where /proc/stat cannot be read (not Linux), or
the user fixed the count with OMP_NUM_THREADS, nothing changes.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

SAMPLE_S = 0.1
STAT = Path("/proc/stat")


def _core_times(stat_text: str, cores: set[int]) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each listed core, from /proc/stat's `cpuN` lines."""
    times = {}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        core = int(name[3:])
        if core in cores and len(fields) >= 4:
            values = [int(v) for v in fields[:8]]
            # idle + iowait, and time spent by niced processes (a CPU training run lowers
            # itself to nice 19): a thread of ours takes that core from them at once.
            idle = values[1] + values[3] + (values[4] if len(values) > 4 else 0)
            times[core] = (idle, sum(values))
    return times


def idle_cores(sample_s: float = SAMPLE_S, read=lambda: STAT.read_text()) -> float | None:
    """How many of the cores this process may run on were idle over the last `sample_s`
    seconds (2.0 for two idle cores), or None where that cannot be read."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    try:
        before = _core_times(read(), cores)
        time.sleep(sample_s)
        after = _core_times(read(), cores)
    except (OSError, ValueError):
        return None
    idle = 0.0
    for core, (idle_then, total_then) in before.items():
        idle_now, total_now = after.get(core, (idle_then, total_then))
        if total_now > total_then:
            idle += (idle_now - idle_then) / (total_now - total_then)
    return idle if before else None


def decode_threads(most: int, idle=idle_cores) -> int:
    """Threads for the next reply: the idle cores, rounded, between 1 and `most`."""
    if "OMP_NUM_THREADS" in os.environ:
        return most
    free = idle()
    if free is None:
        return most
    return max(1, min(most, int(free + 0.5)))
