"""Issue #36: an import or export stopped mid-write leaves nothing that the next command does not
remove. SIGTERM and SIGHUP stop it as Ctrl-C does (one line, exit 130, the half-written folder
removed); kill -9 leaves the folder, and the next command that writes there removes it. A
folder that a live process still writes is never removed, and nothing bitnet did not make."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import torch

from bitnet_cli.store import files
from bitnet_cli.store.files import atomic_folder, remove_abandoned
from tests.cli import home_at, invoke, optional, wait_until
from tests.test_import import SHAPE, bitnet_quantization, write_source

# A source whose import takes seconds and whose run weighs about 100 MB (float32 latent
# weights), so that a write is caught midway even on a fast machine.
BIG = {**SHAPE, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
       "num_attention_heads": 8, "num_key_value_heads": 4}
STOP_LINE = "stopped by {}; nothing half-written was left behind\n"


def source(folder, shape):
    transformers = optional("transformers")
    torch.manual_seed(0)
    model = transformers.BitNetForCausalLM(transformers.BitNetConfig(**shape))
    return write_source(folder, model.to(torch.bfloat16), bitnet_quantization("online"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """(a big source, a small one)."""
    root = tmp_path_factory.mktemp("sources")
    return source(root / "big", BIG), source(root / "small", SHAPE)


@pytest.fixture(scope="module")
def big_run(sources, tmp_path_factory):
    """The big source imported once, as a run to export (by its path)."""
    with home_at(tmp_path_factory.mktemp("home")) as home:
        invoke("import", sources[0], "--name", "big")
    return home / "runs" / "big"


def partials(folder, name):
    """The temporary folders atomic_folder made for `name` in `folder`."""
    return sorted(p for p in folder.glob(f".{name}.*.partial") if p.is_dir())


def writing(folder, name, known=()) -> bool:
    """Whether a temporary folder of `name`, other than those `known`, holds a file with bytes
    in it yet."""
    for partial in set(partials(folder, name)) - set(known):
        with contextlib.suppress(OSError):  # renamed or removed while looking
            if any(f.is_file() and f.stat().st_size for f in partial.rglob("*")):
                return True
    return False


def stop_mid_write(args, folder, name, sig, tries=3):
    """Run `bitnet ARGS` in a child process, which writes `name` in `folder`, and send it `sig`
    as soon as its temporary folder holds written bytes. A child that got its folder into place
    before the signal (a machine faster than this one) is run again, up to `tries` times; the
    test fails unless one was stopped mid-write. Returns that child, finished, its stderr in
    .said."""
    known = partials(folder, name)  # planted by the test
    for _ in range(tries):
        proc = subprocess.Popen([sys.executable, "-m", "bitnet_cli", *map(str, args)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        with proc:
            wait_until(lambda: proc.poll() is not None or writing(folder, name, known),
                       f"{args[0]} to write {name}", proc, timeout=300, every=0.001)
            sent = proc.poll() is None
            if sent:
                proc.send_signal(sig)
            proc.said = proc.communicate(timeout=120)[1]  # its stderr
        if not (folder / name).exists():
            assert sent, f"{args[0]} failed before it wrote anything: {proc.said}"
            return proc
        assert proc.returncode in (0, 128 + sig, -sig, 130), proc.said
        shutil.rmtree(folder / name)  # finished first: try again
    pytest.fail(f"{args[0]} finished before it could be stopped, {tries} times: make BIG bigger")


def test_import_killed_mid_write_leaves_a_folder_that_the_next_import_removes(sources,
                                                                              bitnet_home):
    runs = bitnet_home / "runs"
    proc = stop_mid_write(["import", sources[0], "--name", "big"], runs, "big", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    left = partials(runs, "big")
    assert left and sum(f.stat().st_size for f in left[0].rglob("*") if f.is_file()) > 0
    invoke("import", sources[1], "--name", "small")  # another source, another name
    assert sorted(os.listdir(runs)) == ["small"]
    assert invoke("runs", "list").stdout.split() == ["small"]


# SIGHUP takes SIGTERM's path: the default suite sends one, -m slow both
@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGHUP", marks=pytest.mark.slow)])
def test_a_stop_signal_during_import_is_one_line_and_leaves_nothing(sources, bitnet_home, name):
    sig = signal.Signals[name]
    runs = bitnet_home / "runs"
    proc = stop_mid_write(["import", sources[0], "--name", "big"], runs, "big", sig)
    assert proc.returncode == 130, proc.said
    assert proc.said == STOP_LINE.format(sig.name)
    assert os.listdir(runs) == []


def plant_neighbours(folder, elsewhere):
    """Things beside an export's OUT that bitnet did not make, or made for another name: a
    sweep leaves them all. Returns what they hold, to compare after."""
    (folder / ".out.abcd1234.partial").write_text("a file, not a folder")
    for name in (".other.abcd1234.partial", ".out.partial", ".out.x.y.partial", "out.ab.partial"):
        (folder / name).mkdir()
        (folder / name / "mine").write_text(name)
    (elsewhere / "kept").mkdir(parents=True)
    (elsewhere / "kept" / "mine").write_text("outside")
    (folder / ".out.link1234.partial").symlink_to(elsewhere / "kept")
    return neighbours(folder)


def neighbours(folder):
    return {p.name: (p.read_text() if p.is_file() else sorted(os.listdir(p)))
            for p in folder.iterdir() if p.name != "out"}


def test_export_killed_mid_write_leaves_a_folder_that_the_next_export_removes(big_run,
                                                                              tmp_path):
    folder = tmp_path / "exports"
    folder.mkdir()
    before = plant_neighbours(folder, tmp_path / "elsewhere")
    args = ["export", big_run, "--format", "hf", "--out", folder / "out"]
    proc = stop_mid_write(args, folder, "out", signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    killed = [p for p in partials(folder, "out") if p.name not in before]
    assert len(killed) == 1 and any(killed[0].iterdir())
    invoke(*args)
    assert (folder / "out/model.safetensors").is_file()
    assert neighbours(folder) == before
    assert (tmp_path / "elsewhere/kept/mine").read_text() == "outside"


@pytest.mark.parametrize("name", ["SIGTERM", pytest.param("SIGINT", marks=pytest.mark.slow)])
def test_a_stop_signal_during_export_is_one_line_and_leaves_nothing(big_run, tmp_path, name):
    sig = signal.Signals[name]
    folder = tmp_path / "exports"
    folder.mkdir()
    args = ["export", big_run, "--format", "hf-packed", "--out", folder / "out"]
    proc = stop_mid_write(args, folder, "out", sig)
    assert proc.returncode == 130, proc.said
    how = "interrupted" if sig == signal.SIGINT else f"stopped by {sig.name}"
    assert proc.said == f"{how}; nothing half-written was left behind\n"
    assert os.listdir(folder) == []


WRITER = """
import sys
from pathlib import Path
from bitnet_cli.store.files import atomic_folder
with atomic_folder(Path(sys.argv[1])) as folder:
    (folder / "x").write_text("written")
    sys.stdin.read()  # until the test closes it
"""


def start_writer(final):
    """A process writing `final` through atomic_folder, until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final)], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until(lambda: writing(final.parent, final.name), "the writer to write", proc)
    return proc


def test_a_live_writers_folder_is_never_removed(sources, bitnet_home):
    runs = bitnet_home / "runs"
    runs.mkdir(parents=True)
    proc = start_writer(runs / "held")
    with proc:
        remove_abandoned(runs)
        remove_abandoned(runs, "held")
        invoke("import", sources[1], "--name", "small")  # sweeps the runs folder
        assert len(partials(runs, "held")) == 1
        proc.stdin.close()  # the writer finishes: its folder is renamed into place
        assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert (runs / "held/x").read_text() == "written"
    assert partials(runs, "held") == []
    proc = start_writer(runs / "killed")
    proc.kill()
    proc.wait()
    assert len(partials(runs, "killed")) == 1
    remove_abandoned(runs)
    assert sorted(os.listdir(runs)) == ["held", "small"]


def test_this_process_own_folder_is_not_removed_while_it_writes(tmp_path):
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "x").write_text("written")
        remove_abandoned(tmp_path, "out")
        remove_abandoned(tmp_path)
        assert (folder / "x").is_file()
    assert (tmp_path / "out/x").read_text() == "written"


def test_a_sweep_between_making_the_folder_and_locking_it_costs_only_a_new_folder(tmp_path,
                                                                                   monkeypatch):
    made = []
    real = tempfile.mkdtemp

    def mkdtemp_then_sweep(*args, **kwargs):
        made.append(real(*args, **kwargs))
        if len(made) == 1:  # another process sweeps before this one holds the lock
            remove_abandoned(tmp_path, "out")
        return made[-1]

    monkeypatch.setattr(files.tempfile, "mkdtemp", mkdtemp_then_sweep)
    with atomic_folder(tmp_path / "out") as folder:
        (folder / "x").write_text("written")
    assert len(made) == 2 and not os.path.exists(made[0])
    assert os.listdir(tmp_path) == ["out"] and (tmp_path / "out/x").read_text() == "written"
