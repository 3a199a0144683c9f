"""The CPU cores, read from /proc/stat: a chat decodes on as many threads as there are idle
cores; a background training run keeps its thread count and keeps to the free cores."""

import os
import subprocess
import sys

import pytest

from bitnet_cli.nn import cores
from bitnet_cli.training.session import sharing_line
from bitnet_cli.use import cpu
from tests.cli import invoke

STAT = """cpu  100 0 100 800 0 0 0 0 0 0
cpu0 {u0} {n0} 0 {i0} 0 0 0 0 0 0
cpu1 {u1} {n1} 0 {i1} 0 0 0 0 0 0
intr 1 2 3
"""


def reader(*samples):
    texts = iter(STAT.format(**{"n0": 0, "n1": 0, **sample}) for sample in samples)
    return lambda: next(texts)


def test_idle_cores_counts_each_core_of_ours():
    ours = os.sched_getaffinity(0)
    # Over the sample: cpu0 all idle (10 of 10 jiffies), cpu1 a quarter idle.
    read = reader(dict(u0=0, i0=0, u1=0, i1=0), dict(u0=0, i0=10, u1=30, i1=10))
    idle = cores.idle_cores(0, read)
    expected = (1.0 if 0 in ours else 0) + (0.25 if 1 in ours else 0)
    assert idle == expected


def test_cores_busy_with_niced_work_count_as_idle():
    """A CPU training run lowers itself to nice 19: a chat's threads take those cores first."""
    ours = os.sched_getaffinity(0)
    read = reader(dict(u0=0, i0=0, u1=0, i1=0), dict(u0=0, n0=10, i0=0, u1=5, n1=5, i1=0))
    expected = (1.0 if 0 in ours else 0) + (0.5 if 1 in ours else 0)
    assert cores.idle_cores(0, read) == expected


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
    assert cores.idle_cores(0, unreadable) is None
    assert cores.idle_cores(0, lambda: "garbage\n") is None


def stat(busy: dict[int, int], niced: dict[int, int] | None = None, then=None,
         jiffies: int = 100) -> dict[str, int]:
    """/proc/stat after `jiffies` more per core than `then`: `busy` of them user time and
    `niced` niced, the rest idle."""
    then = then or {"u0": 0, "n0": 0, "i0": 0, "u1": 0, "n1": 0, "i1": 0}
    now = dict(then)
    for core in (0, 1):
        b, n = busy.get(core, 0), (niced or {}).get(core, 0)
        now[f"u{core}"] += b
        now[f"n{core}"] += n
        now[f"i{core}"] += jiffies - b - n
    return now


class FakeMachine:
    """Two cores whose /proc/stat a test writes, a clock it moves, and the cores the process
    was last kept to."""

    def __init__(self):
        self.fields = stat({})
        self.time = 0.0
        self.kept_to = []

    def run(self, busy: dict[int, int], niced: dict[int, int] | None = None,
            seconds: float = 1.0):
        self.fields = stat(busy, niced, self.fields)
        self.time += seconds

    def follower(self):
        return cores.CoreFollower(read=lambda: STAT.format(**self.fields),
                                  keep_to=self.kept_to.append, clock=lambda: self.time,
                                  sleep=lambda s: self.run({1: 100}, seconds=s), environ={})


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(cores, "allowed_cores", lambda: {0, 1})
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this system")
    return FakeMachine()


def test_a_background_run_keeps_to_the_cores_other_work_leaves_free(two_cores):
    machine = two_cores
    follower = machine.follower()
    assert follower.start() == (1, 2) and machine.kept_to == [{0}]  # core 1 was busy
    machine.run({1: 100}, seconds=0.5)
    assert follower.follow() is None  # not a second yet: not even read
    machine.run({1: 100}, {0: 100}, seconds=0.5)  # our own niced work on core 0
    assert follower.follow() is None and machine.kept_to == [{0}]
    machine.run({0: 100})  # the other work moved: so do we, with no word (still one core)
    assert follower.follow() is None and machine.kept_to == [{0}, {1}]
    machine.run({}, {0: 60, 1: 100})  # niced work is no reason to stay off a core
    assert follower.follow() == (2, 2) and machine.kept_to[-1] == {0, 1}
    machine.run({0: 90, 1: 90})  # both busy: nowhere better to go
    assert follower.follow() is None and machine.kept_to[-1] == {0, 1}
    machine.run({0: 100})
    assert follower.follow() == (1, 2)
    follower.stop()  # training over: every core back
    assert machine.kept_to[-1] == {0, 1}
    machine.run({0: 100})
    assert follower.follow() is None


def never(*args):
    raise AssertionError("not to be called")


def test_user_bound_threads_and_one_core_are_left_alone(two_cores, monkeypatch):
    follower = cores.CoreFollower(read=never, keep_to=never, sleep=never,
                                  environ={"OMP_PROC_BIND": "close"})
    assert follower.start() is None and follower.follow() is None
    monkeypatch.setattr(cores, "allowed_cores", lambda: {3})
    assert cores.CoreFollower(environ={}).start() is None


def test_the_live_view_says_when_training_shares_the_cpu(monkeypatch):
    from bitnet_cli.training import session

    class Shared:  # a follower that finds one of two cores busy, then both free
        def __init__(self):
            self.changes = iter([(2, 2)])

        def start(self):
            return 1, 2

        def follow(self):
            return next(self.changes, None)

        def stop(self):
            pass

    monkeypatch.setattr(session, "CoreFollower", Shared)
    out = invoke("train", "simple", "--steps", "3", "--no-compile").stderr
    assert "note: sharing the CPU: other work keeps 1 of the 2 cores busy" in out
    assert "note: all 2 cores are free again" in out
    assert "sharing" not in invoke("train", "simple", "--steps", "3", "--no-compile",
                                   "--foreground").stderr


def test_the_sharing_line_says_when_a_resume_would_share_better(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert sharing_line(1, 4, "run-1") == (
        "sharing the CPU: other work keeps 3 of the 4 cores busy, so training keeps to the "
        "other 1 while they are (the same weights, fewer tokens/s)")
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert sharing_line(1, 2, "run-1").endswith("go on at the shared pace")
    assert "`bitnet resume run-1`" in sharing_line(1, 2, "run-1")
    assert sharing_line(2, 2, "run-1") == "all 2 cores are free again: training on every one"


@pytest.mark.slow  # two trainings; the default suite stays within five minutes
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 if hasattr(os, "sched_getaffinity")
                    else True, reason="needs two cores to keep a run to one")
def test_a_run_kept_to_one_core_trains_the_same_weights(monkeypatch, bitnet_home):
    """The thread count, not the cores, decides the floats."""
    import torch

    from bitnet_cli.training import session
    one_core = {min(os.sched_getaffinity(0))}

    class OneCore(cores.CoreFollower):
        def start(self):
            self.keep_to(one_core)
            self.in_use = one_core
            return len(one_core), len(self.allowed)

    args = ["train", "simple", "--steps", "12", "--save-every", "12", "--no-compile"]
    allowed = os.sched_getaffinity(0)
    invoke(*args, "--name", "all-cores")
    threads = torch.get_num_threads()
    monkeypatch.setattr(session, "CoreFollower", OneCore)
    assert "sharing the CPU" in invoke(*args, "--name", "one-core").stderr
    assert torch.get_num_threads() == threads
    assert os.sched_getaffinity(0) == allowed  # every core given back

    def weights(name):
        return next((bitnet_home / "runs" / name).glob("checkpoints/step_*/model.safetensors"))

    assert weights("all-cores").read_bytes() == weights("one-core").read_bytes()


WAIT_POLICY_CHILD = """if True:
    import sys
    from bitnet_cli.nn import cores
    idle = [float(share) for share in sys.argv[1:]]
    cores.choose_wait_policy(sample=lambda niced_idle: dict(enumerate(idle)))
    import torch
    torch.ones(1)
"""


@pytest.mark.parametrize("idle, user, spin_count", [
    (["1.0", "0.1"], {}, "0"),  # core 1 busy: waiting threads sleep at once
    (["1.0", "0.9"], {}, "300000"),  # libgomp's own default
    (["1.0", "0.1"], {"GOMP_SPINCOUNT": "1000"}, "1000"),  # the user's choice stands
])
def test_threads_sleep_waiting_when_training_starts_beside_busy_cores(idle, user, spin_count):
    """Set before torch is imported, the policy reaches its OpenMP runtime, which lists its
    settings as it loads with OMP_DISPLAY_ENV."""
    env = {k: v for k, v in os.environ.items() if k not in cores.WAIT_SETTINGS}
    done = subprocess.run([sys.executable, "-c", WAIT_POLICY_CHILD, *idle], capture_output=True,
                          text=True, timeout=120,
                          env={**env, **user, "OMP_DISPLAY_ENV": "VERBOSE"})
    assert done.returncode == 0, done.stderr
    if "GOMP_SPINCOUNT" not in done.stderr:
        pytest.skip("PyTorch's OpenMP here is not libgomp")
    assert f"GOMP_SPINCOUNT = '{spin_count}'" in done.stderr


def test_the_wait_policy_is_left_alone_once_torch_is_loaded():
    environ = {}
    cores.choose_wait_policy(environ, sample=lambda niced_idle: {0: 1.0, 1: 0.1})
    assert environ == {}  # torch is loaded in this process: too late to matter


def test_a_server_has_openmp_threads_spin_briefly_or_sleep(monkeypatch):
    """bitnet serve's web side runs between the engine's regions, on the same cores: on free
    cores its threads spin briefly, beside a busy program they sleep at once."""
    import types
    # as in a fresh `bitnet serve`, before torch loads
    monkeypatch.setattr(cores, "sys", types.SimpleNamespace(modules={}))
    environ = {}
    cores.choose_wait_policy(environ, sample=lambda niced_idle: {0: 1.0, 1: 0.9}, shared=True)
    assert environ == {"GOMP_SPINCOUNT": str(cores.SHARED_SPINCOUNT)}
    environ = {}
    cores.choose_wait_policy(environ, sample=lambda niced_idle: {0: 1.0, 1: 0.1}, shared=True)
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "ACTIVE"}
    cores.choose_wait_policy(chosen, sample=lambda niced_idle: {0: 1.0, 1: 0.1}, shared=True)
    assert chosen == {"OMP_WAIT_POLICY": "ACTIVE"}  # the user's choice stands
