"""The thread count for decoding: as many threads as idle cores, read from /proc/stat."""

import os
import subprocess
import sys

import pytest

from bitnet_cli.use import cpu

STAT = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 {u0} {n0} 0 {i0} 0 0 0 0 0 0
cpu1 {u1} {n1} 0 {i1} 0 0 0 0 0 0
intr 1 2 3
"""


def reader(*samples):
    texts = iter(STAT.format(**{"n0": 0, "n1": 0, **sample}) for sample in samples)
    return lambda: next(texts)


def test_idle_cores_counts_each_core_of_ours():
    cores = os.sched_getaffinity(0)
    # Over the sample: cpu0 all idle (10 of 10 jiffies), cpu1 a quarter idle.
    read = reader(dict(u0=0, i0=0, u1=0, i1=0), dict(u0=0, i0=10, u1=30, i1=10))
    idle = cpu.idle_cores(0, read)
    expected = (1.0 if 0 in cores else 0) + (0.25 if 1 in cores else 0)
    assert idle == expected


def test_cores_busy_with_niced_work_count_as_idle():
    """A CPU training run lowers itself to nice 19: a chat's threads take those cores first."""
    cores = os.sched_getaffinity(0)
    read = reader(dict(u0=0, i0=0, u1=0, i1=0), dict(u0=0, n0=10, i0=0, u1=5, n1=5, i1=0))
    expected = (1.0 if 0 in cores else 0) + (0.5 if 1 in cores else 0)
    assert cpu.idle_cores(0, read) == expected


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="Linux's per-thread nice values")
def test_a_cpu_training_run_lowers_every_thread_to_nice_19():
    """Threads that already exist (torch's pool) and those made later."""
    code = """if True:
        import os, threading, torch
        torch.set_num_threads(2)
        torch.ones(2**20).sum()  # the intra-op pool is running now
        from bitnet_cli.training.setup import run_in_background
        run_in_background()
        later = threading.Thread(target=lambda: print(os.getpriority(os.PRIO_PROCESS, 0)))
        later.start(); later.join()
        nice = set()
        for task in os.listdir("/proc/self/task"):
            try:
                nice.add(os.getpriority(os.PRIO_PROCESS, int(task)))
            except ProcessLookupError:  # a thread that ended meanwhile
                pass
        print(len(os.listdir("/proc/self/task")), sorted(nice))"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    later, threads = done.stdout.splitlines()
    count, nice = threads.split(" ", 1)
    assert later == "19" and int(count) > 1 and nice == "[19]"


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
