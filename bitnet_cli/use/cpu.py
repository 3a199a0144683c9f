"""How many threads a chat decodes its next reply on: as many as there are idle cores.

Decoding a token runs a few dozen small parallel regions, and each waits at its end for its
slowest thread. When another process keeps the cores busy (a training run beside a chat), the
OS deschedules one of our threads now and then, every region waits for it, and two threads on
two shared cores decode 3-5x slower than one (measured at 95M: 40-73 tok/s against 80-110).
So before each reply, `decode_threads` samples how idle each core of ours was over a tenth of a
second (nn/cores.py) and decodes with as many threads as there are idle cores, at least one, at
most the thread count PyTorch started with. A core busy only with niced work counts as idle:
a CPU training run lowers itself to nice 19 (training/setup.py), and beside it a chat's threads
get the cores first, so it decodes at its quiet speed. Where /proc/stat cannot be read (not
Linux), or the user fixed the count with OMP_NUM_THREADS, nothing changes.
"""

from __future__ import annotations

import os

from bitnet_cli.nn.cores import idle_cores


def decode_threads(most: int, idle=idle_cores) -> int:
    """Threads for the next reply: the idle cores, rounded, between 1 and `most`."""
    if "OMP_NUM_THREADS" in os.environ:
        return most
    free = idle()
    if free is None:
        return most
    return max(1, min(most, int(free + 0.5)))
