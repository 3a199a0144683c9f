"""Driving the CLI in-process, as a user would from a shell."""

import contextlib
import functools
import hashlib
import importlib
import json
import os
import select
import subprocess
import time

import pytest
from typer.testing import CliRunner

from bitnet_cli.cli import app

class Runner(CliRunner):
    """CliRunner, except that Ctrl-C stops pytest. A training under test catches the SIGINT as
    it should (it saves a checkpoint and exits 130), which alone would fail only the one test
    while the session carried on; so exit 130 that a test did not ask for is raised again as
    the KeyboardInterrupt it was."""

    def invoke(self, *args, interrupt_expected=False, **kwargs):
        result = super().invoke(*args, **kwargs)
        if result.exit_code == 130 and not interrupt_expected:
            raise KeyboardInterrupt("interrupted while running `bitnet` in-process")
        return result


runner = Runner()


def invoke(*args, code=0):
    """Run `bitnet ARGS...` and check its exit code; the result has .stdout and .stderr."""
    result = runner.invoke(app, [str(a) for a in args], interrupt_expected=code == 130)
    assert result.exit_code == code, result.output + result.stderr
    return result


def snapshot(root, skip=()):
    """Every path under `root` but those under `skip`: its content hash, link target or kind,
    to compare before and after a command that must leave them alone."""
    seen = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            if any(path == s or path.startswith(s + os.sep) for s in skip):
                continue
            if os.path.islink(path):
                seen[path] = "link " + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    seen[path] = hashlib.sha256(f.read()).hexdigest()
            else:
                seen[path] = "folder"
    return seen


def optional(module: str, whole_file: bool = False):
    """A package of the [test] extra that not every contributor installs (transformers,
    llama-cpp-python): the module, or a skip that says how to install it. In CI (CI set) a
    missing one fails instead: CI never skips a check silently."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"needs {module}: pip install -e '.[test]'"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI installs every test dependency)", pytrace=False)
        pytest.skip(message, allow_module_level=whole_file)


FORCED_CPU = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


@functools.cache
def _compile_problem():
    import torch
    try:
        torch.compile(lambda x: x * 2)(torch.ones(3))
        return None
    except Exception as e:  # whatever inductor raised
        from bitnet_cli.errors import first_line
        return first_line(e)


def needs_torch_compile():
    """Skip where torch.compile cannot build because the suite runs as another CPU would
    (ATEN_CPU_CAPABILITY or ONEDNN_MAX_CPU_ISA forced, as CI does for the engine tests: on some
    machines inductor then cannot build). transformers' packed-weight loader compiles too. The
    product's own eager fallback is what the forced run checks instead; unforced, a compiler
    that fails is a failure."""
    why = _compile_problem()
    forced = [f"{name}={os.environ[name]}" for name in FORCED_CPU if os.environ.get(name)]
    if why and forced:
        pytest.skip(f"torch.compile cannot build under {' '.join(forced)} ({why})")


def state_step(path):
    """The step a state.json says; 0 while it is absent or being replaced."""
    try:
        return json.loads(path.read_text()).get("step", 0)
    except (OSError, ValueError):
        return 0


def wait_until(condition, what, proc=None, timeout=120, every=0.005, pause=None):
    """condition()'s first truthy value, checked again each time `pause(seconds)` returns, until
    `timeout`: the one way tests wait for a state, a file or an output. `pause` blocks until
    there may be news (at most the seconds given); by default it waits on `proc`, the process
    that makes the change, for `every` seconds, and the wait fails early if `proc` exits."""
    if pause is None:
        assert proc is not None, "wait_until needs the process that makes the change, or a pause"
        pause = functools.partial(wait_on, proc)
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process exited ({proc.returncode}) before {what}")
        left = deadline - time.monotonic()
        assert left > 0, f"waited {timeout} s for {what}"
        pause(min(every, left))
    return value


def wait_on(proc, seconds):
    """Block until `proc` exits or `seconds` pass."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)


def wait_for_exit(pids, what, timeout=30):
    """Block until every process in `pids` has exited (children or not: each is watched through
    a pidfd), or fail at the deadline."""
    fds = []
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds.append(os.pidfd_open(pid))
    deadline = time.monotonic() + timeout
    try:
        while fds:
            left = deadline - time.monotonic()
            assert left > 0, f"waited {timeout} s for {what}"
            for fd in select.select(fds, [], [], left)[0]:
                fds.remove(fd)
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)


@contextlib.contextmanager
def home_at(home, cache=None):
    """Runs (and token shards) under `home` for the block: a module fixture that trains once
    builds there, outside the per-test folders that conftest.py sets."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BITNET_HOME", str(home))
        mp.setenv("BITNET_CACHE", str(cache or home / "cache"))
        yield home


class TmuxPane:
    """A command in a real terminal: a private tmux server with one pane of `width` columns.
    Waits read the screen again whenever the pane sends output (through a FIFO), so they wake as
    soon as the screen changes, up to a deadline."""

    def __init__(self, command: str, folder, width: int = 80, height: int = 200):
        self.tmux = ["tmux", "-L", f"bitnet-test-{os.getpid()}-{id(self)}"]
        subprocess.run(self.tmux + ["new-session", "-d", "-s", "t", "-x", str(width), "-y",
                                    str(height), command],
                       check=True, env={**os.environ, "TERM": "xterm-256color"})
        fifo = folder / f"pane-{id(self)}"
        os.mkfifo(fifo)
        subprocess.run(self.tmux + ["pipe-pane", "-t", "t", f"cat > {fifo}"], check=True)
        self.pane = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def screen(self) -> str:
        return subprocess.run(self.tmux + ["capture-pane", "-p", "-t", "t", "-S", "-500"],
                              capture_output=True, text=True).stdout

    def _new_output(self, seconds: float) -> None:
        if select.select([self.pane], [], [], seconds)[0]:
            assert os.read(self.pane, 65536), "the pane stopped sending output"

    def wait_for(self, text: str, count: int = 1, timeout: float = 120) -> str:
        """The screen, once `text` shows on it `count` times."""
        return self.wait_until(lambda screen: screen.count(text) >= count,
                               f"{text!r} on the screen", timeout)

    def wait_until(self, condition, what: str, timeout: float = 120) -> str:
        """The screen, once condition(screen) holds."""
        return wait_until(lambda: condition(s := self.screen()) and s, what, timeout=timeout,
                          every=0.2, pause=self._new_output)

    def send(self, *keys: str) -> None:
        subprocess.run(self.tmux + ["send-keys", "-t", "t", *keys], check=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        subprocess.run(self.tmux + ["kill-server"], capture_output=True)
        os.close(self.pane)
        return False
