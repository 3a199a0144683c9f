"""Building and loading the 2-bit kernel (nn/kernel_build.py) as a user meets it: a compile
killed half-way, a compiler that fails, a damaged or foreign library in the cache, a read-only
cache, no compiler at all. Each ends with `bitnet chat` answering: through the 2bit engine where
a good build can be had, else through the int8 engine after one line saying why.

The tests that compile give the build its own TORCH_EXTENSIONS_DIR; those that need a good build
copy the session's (conftest built it) instead of compiling one."""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap

import pytest

from bitnet_cli.nn import kernel, kernel_build
from bitnet_cli.use.loading import load_model
from tests.cli import invoke, snapshot, wait_until

PROMPT = "d3="


def chat(run, env, timeout=120):
    """`bitnet chat RUN --prompt PROMPT` in a process of its own."""
    return subprocess.run([sys.executable, "-m", "bitnet_cli", "chat", str(run), "--prompt",
                           PROMPT], env=env, capture_output=True, text=True, timeout=timeout)


def assert_answers_through_2bit(done, answer):
    assert done.returncode == 0, done.stderr
    assert done.stdout == answer
    assert ", 2bit engine" in done.stderr.splitlines()[-1], done.stderr


@pytest.fixture(scope="module")
def answer(short_run, tmp_path_factory):
    """What chat answers through the session's good build."""
    home = tmp_path_factory.mktemp("answer-home")
    env = {**os.environ, "BITNET_HOME": str(home), "BITNET_CACHE": str(home / "cache")}
    done = chat(short_run("simple"), env)  # what a 30-step model says is its own affair
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def good_cache(tmp_path):
    """A cache folder holding a copy of the session's good build: its record and its folder."""
    name = f"bitnet_ternary_{kernel_build.build_key()}"
    session = kernel_build.kernels_dir()
    record = json.loads((session / f"{name}.json").read_text())
    cache = tmp_path / "extensions"
    build = record["library"].split("/")[0]
    shutil.copytree(session / build, cache / build)
    shutil.copy(session / f"{name}.json", cache)
    return cache, name, cache / record["library"]


@pytest.mark.slow  # a real compile (~20 s); the default suite stays within five minutes
def test_a_compile_killed_half_way_is_redone_by_the_next_chat(short_run, tmp_path, answer):
    """kill -9 of a first chat while it compiles leaves torch's own lock file in the build
    folder, which torch alone would wait on forever: the next chat builds anew and answers."""
    extensions = tmp_path / "extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(extensions)}
    notices = tmp_path / "stderr"
    with open(notices, "w") as stderr:
        first = subprocess.Popen([sys.executable, "-m", "bitnet_cli", "chat",
                                  str(short_run("simple")), "--prompt", PROMPT], env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        wait_until(lambda: "compiling" in notices.read_text()
                   and any(extensions.glob("*/build.ninja")), "the compile under way", proc=first,
                   every=0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert any(extensions.glob("*/lock"))  # torch's, left by the killed build
    assert_answers_through_2bit(chat(short_run("simple"), env, timeout=60), answer)
    assert not any(extensions.glob("*/lock"))


FAILING_COMPILER = """\
#!/bin/sh
echo "$*" >> {calls}
if [ "$1" = --version ]; then {version}; fi
echo "x.cpp: In function 'int f()':" >&2
echo "x.cpp:3:1: error: broken on purpose" >&2
echo "    3 | }}" >&2
exit 1
"""


def failing_compiler(folder, version_works: bool):
    """A g++ that fails to compile (and its --version fails too, unless `version_works`), and
    the file its calls go to, one line each."""
    folder.mkdir()
    compiler, calls = folder / "g++", folder / "calls"
    version = ('echo "g++ 12.2.0"; exit 0' if version_works
               else 'echo "g++: broken on purpose" >&2; exit 1')
    compiler.write_text(FAILING_COMPILER.format(calls=calls, version=version))
    compiler.chmod(0o755)
    calls.write_text("")
    return compiler, calls


def test_a_failing_compiler_is_remembered_and_not_run_again(short_run, tmp_path):
    compiler, calls = failing_compiler(tmp_path / "bin", version_works=False)
    env = {**os.environ, "CXX": str(compiler),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    done = [chat(short_run("simple"), env)]
    ran = calls.read_text()
    done += [chat(short_run("simple"), env) for _ in range(2)]
    failure = next((tmp_path / "extensions").glob("*.failed.json"))
    assert ran and calls.read_text() == ran  # the later chats ran no compiler
    for each in done:
        assert each.returncode == 0, each.stderr
        assert each.stderr.splitlines()[0] == (
            f"2bit engine not used: no C++ compiler (CXX={compiler} --version fails: "
            "g++: broken on purpose); not tried again until the compiler changes "
            f"(delete {failure} to retry); decoding with the int8 engine")
        assert len(each.stderr.splitlines()) == 2, each.stderr  # and chat's line of figures
        assert ", int8 engine" in each.stderr.splitlines()[1]
        assert each.stdout == done[0].stdout


def test_a_failed_compile_says_the_compilers_error_until_the_compiler_changes(
        monkeypatch, tmp_path, capfd):
    """Its --version works, so the compile runs and fails: the reason is the compiler's own
    error line, torch's checks of the compiler print nothing, and a changed compiler is run."""
    compiler, calls = failing_compiler(tmp_path / "bin", version_works=True)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    failure = tmp_path / "extensions" / f"bitnet_ternary_{kernel_build.build_key()}.failed.json"
    reasons, ran = [], []
    for _ in range(2):
        with pytest.raises(kernel_build.KernelUnusable) as unusable:
            kernel_build.build_kernel(notice=lambda line: None)
        reasons.append(str(unusable.value))
        ran.append(calls.read_text())
    assert reasons == [f"the ternary kernel did not build (x.cpp:3:1: error: broken on purpose); "
                       f"not tried again until the compiler changes (delete {failure} to "
                       "retry)"] * 2
    assert " -c " in ran[0] and ran[1] == ran[0]  # it compiled, then ran no compiler
    assert capfd.readouterr() == ("", "")
    compiler.write_text(compiler.read_text().replace("broken", "still broken"))
    with pytest.raises(kernel_build.KernelUnusable, match="still broken on purpose"):
        kernel_build.build_kernel(notice=lambda line: None)


def test_the_reason_is_the_compilers_first_error_line():
    output = textwrap.dedent("""\
        Error building extension 'k': [1/3] c++ -c /s/a.cpp -o a.o
        FAILED: a.o
        c++ -c /s/a.cpp -o a.o
        In file included from /s/a.cpp:1:
        /s/a.h: In function 'int f()':
        /s/a.h:2:9: warning: unused variable 'x' [-Wunused-variable]
            2 |     int x;
              |         ^
        /s/a.h:3:1: error: expected ';' before '}' token
        [2/3] c++ -c /s/b.cpp -o b.o
        ninja: build stopped: subcommand failed.
        """)
    assert kernel_build.compiler_error(output) == "/s/a.h:3:1: error: expected ';' before '}' token"
    linked = ("Error building extension 'k': [1/3] c++ a.o -shared -o k.so\nFAILED: k.so\n"
              "c++ a.o -shared -o k.so\n/usr/bin/ld: cannot find -ltorch\n"
              "collect2: error: ld returned 1 exit status\nninja: build stopped: subcommand "
              "failed.")
    assert kernel_build.compiler_error(linked) == "/usr/bin/ld: cannot find -ltorch"


def empty_library(folder):
    """A valid shared library that registers no op."""
    source = folder / "empty.c"
    source.write_text("")
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(folder / "empty.so")],
                   check=True)
    return folder / "empty.so"


@pytest.mark.parametrize("damage", [
    pytest.param("cut short", marks=pytest.mark.slow),  # loaded as it is: a bus error (135)
    pytest.param("without its ops", marks=pytest.mark.slow),  # a library, its record matching
    pytest.param("without a record", marks=pytest.mark.slow)])
def test_a_damaged_build_is_not_loaded_but_built_again(short_run, good_cache, tmp_path, answer,
                                                       damage):
    cache, name, library = good_cache
    record = cache / f"{name}.json"
    if damage == "cut short":
        library.write_bytes(library.read_bytes()[:library.stat().st_size // 2])
    elif damage == "without its ops":
        shutil.copy(empty_library(tmp_path), library)
        record.write_text(json.dumps({**json.loads(record.read_text()),
                                      "size": library.stat().st_size,
                                      "sha256": hashlib.sha256(library.read_bytes()).hexdigest()}))
    else:
        record.unlink()
    done = chat(short_run("simple"), {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)})
    assert_answers_through_2bit(done, answer)
    assert "compiling" in done.stderr.splitlines()[0]
    rebuilt = cache / json.loads(record.read_text())["library"]
    assert rebuilt.parent != library.parent and not library.exists()


def test_a_read_only_cache_with_a_good_build_is_used_as_it_is(short_run, good_cache, answer):
    """Read-only by its permissions (which root ignores), and the build lock cannot be made
    there even as root (a folder stands in its place): the good build loads without it."""
    cache, name, _ = good_cache
    (cache / f"{name}.lock").mkdir()
    before = snapshot(cache)
    modes = {path: path.stat().st_mode for path in [cache, *cache.rglob("*")]}
    for path in modes:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        done = chat(short_run("simple"), {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)})
    finally:
        for path, mode in modes.items():
            path.chmod(mode)
    assert_answers_through_2bit(done, answer)
    assert len(done.stderr.splitlines()) == 1  # no note: nothing compiled
    assert snapshot(cache) == before


def test_without_a_compiler_it_is_int8_and_one_note(short_run, monkeypatch):
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    run = short_run("arithmetic")
    result = invoke("chat", run, "--prompt", "012+035=")
    assert result.stderr.splitlines()[0] == (
        "2bit engine not used: no C++ compiler (CXX=/nonexistent/g++ does not run); "
        "decoding with the int8 engine")
    assert len(result.stderr.splitlines()) == 2  # and chat's line of figures
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.delenv("CXX")
    assert ", 2bit engine" in invoke("chat", run, "--prompt", "012+035=").stderr.splitlines()[-1]


def test_a_path_without_a_compiler_still_chats(short_run, tmp_path):
    """As a pipx install on a machine with no g++: the kernel is never built, chat answers."""
    env = {**os.environ, "PATH": os.path.dirname(sys.executable),
           "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions")}
    env.pop("CXX", None)
    done = chat(short_run("simple"), env)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[0] == ("2bit engine not used: no C++ compiler (g++ does not "
                                           "run); decoding with the int8 engine")
    assert ", int8 engine" in done.stderr.splitlines()[-1]  # whatever a 30-step model says
    assert done.stdout.endswith("\n") and not (tmp_path / "extensions").exists()


def test_an_unwritable_build_folder_is_int8_and_one_note(short_run, monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    monkeypatch.setattr(kernel, "_loaded", {})
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(blocked / "kernels"))
    loaded = load_model(str(short_run("simple")))
    assert loaded.engine == "int8"
    assert loaded.engine_note.startswith("2bit engine not used: the ternary kernel did not build (")


@pytest.mark.slow
def test_a_damaged_build_is_rebuilt_and_two_processes_build_once(tmp_path):
    """Two processes start on an empty build folder at once: one compiles, the other waits on
    the lock and loads that build. Then the built library is damaged: the next process says
    so, compiles again in a new folder and still gets exact sums."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    check = ("from bitnet_cli.nn import kernel as k; ops, why = k.ternary_ops(); "
             "assert ops is not None, why; print('ok')")
    starts = [subprocess.Popen([sys.executable, "-c", check], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in starts]
    assert [out for out, _ in outputs] == ["ok\n", "ok\n"], outputs
    assert sum("compiling" in err for _, err in outputs) >= 1
    (library,) = tmp_path.glob("*/*.so")  # one build
    library.write_bytes(b"not a shared library")
    again = subprocess.run([sys.executable, "-c", check], env=env, text=True,
                           capture_output=True, timeout=600)
    assert again.stdout == "ok\n", again.stderr
    assert "damaged; compiling it again" in again.stderr
    (rebuilt,) = tmp_path.glob("*/*.so")
    assert rebuilt != library
