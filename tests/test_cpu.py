"""The thread count for decoding: as many threads as idle cores, read from /proc/stat."""

import os

from bitnet_cli.use import cpu

STAT = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 {u0} 0 0 {i0} 0 0 0 0 0 0
cpu1 {u1} 0 0 {i1} 0 0 0 0 0 0
intr 1 2 3
"""


def reader(*samples):
    texts = iter(STAT.format(**sample) for sample in samples)
    return lambda: next(texts)


def test_idle_cores_counts_each_core_of_ours():
    cores = os.sched_getaffinity(0)
    # Over the sample: cpu0 all idle (10 of 10 jiffies), cpu1 a quarter idle.
    read = reader(dict(u0=0, i0=0, u1=0, i1=0), dict(u0=0, i0=10, u1=30, i1=10))
    idle = cpu.idle_cores(0, read)
    expected = (1.0 if 0 in cores else 0) + (0.25 if 1 in cores else 0)
    assert idle == expected


def test_decode_threads_follow_the_idle_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu.decode_threads(2, idle=lambda: 2.0) == 2
    assert cpu.decode_threads(2, idle=lambda: 0.1) == 1  # a training run holds both cores
    assert cpu.decode_threads(2, idle=lambda: 1.4) == 1
    assert cpu.decode_threads(4, idle=lambda: 2.6) == 3
    assert cpu.decode_threads(2, idle=lambda: 8.0) == 2  # never more than PyTorch started with
    assert cpu.decode_threads(2, idle=lambda: None) == 2  # unreadable: unchanged
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu.decode_threads(2, idle=lambda: 0.0) == 2  # the user's choice stands


def test_unreadable_stat_changes_nothing():
    def unreadable():
        raise OSError("no /proc here")
    assert cpu.idle_cores(0, unreadable) is None
    assert cpu.idle_cores(0, lambda: "garbage\n") is None
