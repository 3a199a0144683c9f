"""The CPU cores this process computes on: how idle each one is (/proc/stat), how OpenMP's
threads wait, and a background training run kept to the free cores. No torch here.

Every OpenMP parallel region of PyTorch waits at its end for its slowest thread. A CPU
training run lowers itself to nice 19 (training/setup.py), so beside a program at normal
priority that keeps one core busy, our thread on that core gets about 1.5% of it, every region
waits for it, and the thread that waits spins: `train simple` on 2 cores beside `yes` made
55-400 tokens/s against 50k alone. Fewer threads would avoid that, but PyTorch's CPU results depend on the thread count (a
reduction is cut into one part per thread), and a seed must give the same weights whatever
else the machine runs. So the thread count stays as PyTorch chose it (or OMP_NUM_THREADS
said), and instead:
- `CoreFollower` keeps every thread of the process to the free cores, where they take turns;
- `choose_wait_policy` has OpenMP put a waiting thread to sleep at once when a core is busy
  as training starts: spinning through the time slice that the thread it waits for needs
  would cost 100x there. On a free CPU libgomp spins as usual: sleeping between PyTorch's many
  small regions would cost a quarter to half of a tiny model's speed. OpenMP reads this once,
  as PyTorch loads, so a run that finds other work later shares its cores spinning.

For a chat or a core choice, a core busy only with niced work counts as idle: a thread at
normal priority takes it from them at once, and a training run's own work is niced.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

SAMPLE_S = 0.1  # the window of a sample taken on the spot
FOLLOW_EVERY_S = 1.0  # how often a training run looks again at which cores are free
FREE_SHARE = 0.5  # a core idle at least this share of the time is free to train on
# A server's OpenMP threads spin this many rounds (microseconds) before they sleep: enough to
# catch the fused step's back-to-back regions, short enough to leave the web side its turn.
# 95M, 1/4/8 streams through `bitnet serve`: 365/710/664 tok/s, against 327/625/632 spinning
# as libgomp does by default and 160/410/502 sleeping at once.
SHARED_SPINCOUNT = 30000
STAT = Path("/proc/stat")
TASKS = Path("/proc/self/task")
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BINDING_SETTINGS = ("OMP_PROC_BIND", "OMP_PLACES", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")


def _read_stat() -> str:
    return STAT.read_text()


def allowed_cores() -> set[int]:
    """The cores this process may run on (all of them where that cannot be asked)."""
    if hasattr(os, "sched_getaffinity"):
        return os.sched_getaffinity(0)
    return set(range(os.cpu_count() or 1))


def core_times(stat_text: str, cores: set[int],
               niced_idle: bool = True) -> dict[int, tuple[int, int]]:
    """(idle, total) jiffies of each listed core, from /proc/stat's `cpuN` lines: idle and
    iowait, and with `niced_idle` the time spent on niced processes."""
    times = {}
    for line in stat_text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        core = int(name[3:])
        if core in cores and len(fields) >= 4:
            values = [int(v) for v in fields[:8]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            times[core] = (idle + (values[1] if niced_idle else 0), sum(values))
    return times


def idle_shares(before: dict[int, tuple[int, int]],
                after: dict[int, tuple[int, int]]) -> dict[int, float]:
    """How idle each core was between two readings of `core_times`, from 0 to 1 (a core that
    counted no time in between is left out)."""
    shares = {}
    for core, (idle_then, total_then) in before.items():
        idle_now, total_now = after.get(core, (idle_then, total_then))
        if total_now > total_then:
            shares[core] = (idle_now - idle_then) / (total_now - total_then)
    return shares


def sample_idle(sample_s: float = SAMPLE_S, read=_read_stat,
                niced_idle: bool = True) -> dict[int, float] | None:
    """How idle each core this process may run on is over the next `sample_s` seconds, or None
    where that cannot be read."""
    cores = allowed_cores()
    try:
        before = core_times(read(), cores, niced_idle)
        time.sleep(sample_s)
        after = core_times(read(), cores, niced_idle)
    except (OSError, ValueError):
        return None
    return idle_shares(before, after) if before else None


def idle_cores(sample_s: float = SAMPLE_S, read=_read_stat) -> float | None:
    """How many of the cores this process may run on are idle (2.0 for two idle cores)."""
    shares = sample_idle(sample_s, read)
    return None if shares is None else sum(shares.values())


def choose_wait_policy(environ=os.environ, sample=sample_idle, shared: bool = False) -> None:
    """Before PyTorch is first imported: where another program (niced ones too, our equals at
    nice 19) keeps a core busy, OpenMP's waiting threads sleep (OMP_WAIT_POLICY=PASSIVE).
    `shared`: the process's own other threads need the cores between PyTorch's regions
    (`bitnet serve`'s web side, and its clients, mostly on the same machine), so on free cores
    the waiting threads spin only briefly (SHARED_SPINCOUNT) before they sleep. Nothing
    changes where the user chose how they wait, or once PyTorch is loaded."""
    if "torch" in sys.modules or any(name in environ for name in WAIT_SETTINGS):
        return
    shares = sample(niced_idle=False)
    if shares and min(shares.values()) < FREE_SHARE:
        environ["OMP_WAIT_POLICY"] = "PASSIVE"
    elif shared:
        environ["GOMP_SPINCOUNT"] = str(SHARED_SPINCOUNT)


def threads_sleep_waiting(environ=os.environ) -> bool:
    """Whether OpenMP's waiting threads sleep at once (else they spin a while first)."""
    return (environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"
            or environ.get("GOMP_SPINCOUNT", "").strip() == "0")


def keep_threads_to(cores: set[int]) -> None:
    """Every thread of this process onto `cores` (threads made later inherit it)."""
    for task in TASKS.iterdir() if TASKS.is_dir() else []:
        try:
            os.sched_setaffinity(int(task.name), cores)
        except OSError:  # a thread that ended meanwhile
            pass


class CoreFollower:
    """Keeps a background training run's threads to the free cores. `start()` samples them on
    the spot, `follow()` after each step looks again every FOLLOW_EVERY_S seconds; each returns
    (cores trained on, cores allowed) when the count changes, else None. `stop()` gives every
    allowed core back."""

    def __init__(self, read=_read_stat, keep_to=keep_threads_to, clock=time.monotonic,
                 sleep=time.sleep, environ=os.environ):
        self.read, self.keep_to, self.clock, self.sleep = read, keep_to, clock, sleep
        self.allowed = allowed_cores()
        self.in_use = set(self.allowed)
        # Nothing to choose from, or the user bound OpenMP's threads to cores themselves.
        self.active = (len(self.allowed) > 1 and hasattr(os, "sched_setaffinity")
                       and not any(name in environ for name in BINDING_SETTINGS))
        self.last, self.checked = None, 0.0

    def start(self) -> tuple[int, int] | None:
        if not self.active:
            return None
        self.last, self.checked = self._times(), self.clock()
        self.sleep(SAMPLE_S)
        return self._look()

    def follow(self) -> tuple[int, int] | None:
        if self.last is None or self.clock() - self.checked < FOLLOW_EVERY_S:
            return None
        return self._look()

    def stop(self) -> None:
        if self.in_use != self.allowed:
            self.keep_to(self.allowed)
            self.in_use = set(self.allowed)
        self.last = None

    def _times(self) -> dict[int, tuple[int, int]] | None:
        try:
            return core_times(self.read(), self.allowed) or None
        except (OSError, ValueError):
            return None

    def _look(self) -> tuple[int, int] | None:
        now = self._times()
        if now is None or self.last is None:
            self.last = None  # unreadable: stay where we are from here on
            return None
        shares = idle_shares(self.last, now)
        if not shares:  # no time counted yet: look again next step
            return None
        self.last, self.checked = now, self.clock()
        # No core free: every thread waits its turn anyway, so all of them stay open.
        free = {core for core in self.allowed if shares.get(core, 1.0) >= FREE_SHARE}
        free = free or set(self.allowed)
        if free == self.in_use:
            return None
        self.keep_to(free)
        moved_only = len(free) == len(self.in_use)  # other work went to another core
        self.in_use = free
        return None if moved_only else (len(free), len(self.allowed))
