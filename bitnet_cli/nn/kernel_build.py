"""The 2-bit ternary kernel (nn/cpu/), compiled on first use and then reused: a torch C++
extension (ops registered as torch.ops.bitnet_ternary) built with the machine's own compiler
into bitnet's cache folder (or $TORCH_EXTENSIONS_DIR). Everything there is named after
`bitnet_ternary_<key>`, the key covering the sources, the torch and Python versions, the flags
and the CPU architecture, so a stale build is never found:

- `<name>.json` records the good build: its library's path, size and sha256. A library is loaded
  only when it matches its record (loading a cut-short one can crash the process) and used only
  when it has every op the engines call; otherwise it is built again. Loading a recorded build
  takes no lock and writes nothing, so a read-only cache is used as it is.
- `<name>_<token>/` holds one build: torch's build files and the library. Each build gets a new
  folder, so a rebuild is never the library this process already has open under the same path,
  and a build killed half-way (torch's own lock file still in its folder, which torch would
  wait on forever) is only a folder the next build removes.
- `<name>.lock` lets one process build while the others wait (released when a process dies).
- `<name>.failed.json` remembers a failed compile and the compiler it failed with: until either
  changes, later commands give the same one-line reason without running a compiler at all.
  Deleting it tries again.

Anything that stops the kernel is a reason in one line (KernelUnusable); kernel.py checks what
loads before any model uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from bitnet_cli.errors import first_line

HERE = Path(__file__).parent
CPU = HERE / "cpu"  # the arithmetic in plain C++ (kernels.h), and the torch glue beside it
SOURCES = [CPU / name for name in ("portable.cpp", "x86.cpp", "arm.cpp", "torch_ops.cpp",
                                    "decode_step.cpp")]
HEADERS = [CPU / name for name in ("kernels.h", "loops.h", "glue.h")]


def _openmp() -> tuple[list[str], list[str]]:
    """OpenMP's compiler and linker flags: at::parallel_for, inlined into the kernel, runs on
    torch's OpenMP threads only so compiled (Linux: GNU OpenMP, loaded with torch; macOS: torch's
    own libomp and omp.h). Without them the kernel runs on one thread; kernel.py says so."""
    if sys.platform == "linux":
        return ["-fopenmp"], []
    torch_dir = Path(torch.__file__).parent
    if sys.platform == "darwin" and (torch_dir / "include" / "omp.h").exists() and (
            torch_dir / "lib" / "libomp.dylib").exists():
        return ["-Xpreprocessor", "-fopenmp"], [f"-L{torch_dir / 'lib'}", "-lomp"]
    return [], []


# No -ffast-math or FMA contraction: the rescale and the float loops round as torch does.
OPENMP_FLAGS, OPENMP_LINK = _openmp()
FLAGS = ["-O3", "-ffp-contract=off", *OPENMP_FLAGS]
OPS = ("pack", "ternary_mm", "ternary_linear", "isas", "limit_paths", "path_name", "int8_mm",
       "half_linear", "read_bandwidth", "step_profile", "threaded", "decode_step", "decode_batch")
COMPILE_TIME = "about 20 s on a busy 2-core machine"


def build_key() -> str:
    versions = (f"{torch.__version__} {sys.version_info[:2]} {platform.machine()} {FLAGS} "
                f"{OPENMP_LINK}")
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS) + versions.encode()
    return hashlib.sha256(text).hexdigest()[:16]


class KernelUnusable(Exception):
    """Why the kernel cannot be built or loaded here, in one line."""


def build_kernel(notice):
    """The kernel's ops (torch.ops.bitnet_ternary): the recorded build if it checks out, else
    built here; KernelUnusable says why not. `notice` hears the one line a compile takes."""
    from bitnet_cli.nn.compiled import compiler_problem
    name = f"bitnet_ternary_{build_key()}"
    root = kernels_dir()
    failure = root / f"{name}.failed.json"
    remembered = _remembered_failure(failure)
    if remembered:
        raise KernelUnusable(remembered)
    problem = compiler_problem(torch.device("cpu"))
    if problem:
        raise KernelUnusable(_remember_failure(failure, problem.replace(" for torch.compile", "")))
    record = root / f"{name}.json"
    library = _recorded_library(record)
    ops = _load(library) if library else None
    if ops is None:
        ops = _build_and_load(name, root, library, notice)
    if hasattr(torch.library, "register_fake"):  # torch 2.4+: the op's shape, for torch.compile
        torch.library.register_fake("bitnet_ternary::ternary_linear", lambda x, packed, scale,
                                    path: x.new_empty((x.shape[0], packed.shape[0])))
    return ops


def _build_and_load(name: str, root: Path, tried: Path | None, notice):
    """The ops from a new build, or from the one another process recorded while this one waited
    for the lock. `tried` is the recorded library this process found unusable, if any."""
    from filelock import FileLock
    record = root / f"{name}.json"
    try:
        root.mkdir(parents=True, exist_ok=True)
        what = ("the built 2-bit ternary kernel is damaged; compiling it again" if record.exists()
                else "compiling bitnet's 2-bit ternary kernel, once for this machine")
        notice(f"note: {what} ({COMPILE_TIME})")
        with FileLock(str(root / f"{name}.lock")):
            library = _recorded_library(record)
            ops = _load(library) if library and library != tried else None
            if ops is None:
                library = _compile(name, root)
                ops = _load(library)
    except (ImportError, OSError, RuntimeError, subprocess.SubprocessError) as e:  # disk, ninja
        raise KernelUnusable(f"the ternary kernel did not build ({first_line(e)})") from None
    if ops is None:
        raise KernelUnusable(f"the ternary kernel built in {library.parent} lacks its ops")
    return ops


def kernels_dir() -> Path:
    """Where builds live: $TORCH_EXTENSIONS_DIR if the user chose it, else bitnet's cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from bitnet_cli.data.shards import cache_dir
    return cache_dir() / "kernels"


def _recorded_library(record: Path) -> Path | None:
    """The library `record` names, if its size and sha256 are still the recorded ones."""
    try:
        recorded = json.loads(record.read_text())
        library = record.parent / recorded["library"]
        if (library.stat().st_size == recorded["size"]
                and _sha256(library) == recorded["sha256"]):
            return library
    except (OSError, ValueError, KeyError, TypeError):  # none, unreadable, not ours
        pass
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _load(library: Path):
    """torch.ops.bitnet_ternary once `library` is loaded, or None when it does not load or lacks
    an op the engines call."""
    try:
        torch.ops.load_library(str(library))
    except OSError:
        return None
    ops = torch.ops.bitnet_ternary
    return ops if all(hasattr(ops, op) for op in OPS) else None


def _compile(name: str, root: Path) -> Path:
    """The library of a new build in a folder of its own, recorded as the good build. What
    earlier builds left (folders of builds killed half-way, failed or damaged; a remembered
    failure) goes first; a compile that fails is remembered, while the lock is held."""
    from torch.utils.cpp_extension import LIB_EXT, load
    failure = root / f"{name}.failed.json"
    failure.unlink(missing_ok=True)
    for old in root.glob(f"{name}*"):
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    build = f"{name}_{secrets.token_hex(4)}"
    folder = root / build
    folder.mkdir()
    # cpp_extension finds ninja on PATH: the one pip installed beside this Python counts too.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    try:
        with _torch_quiet():
            load(name=build, sources=[str(path) for path in SOURCES], build_directory=str(folder),
                 extra_cflags=FLAGS, extra_ldflags=OPENMP_LINK, is_python_module=False,
                 verbose=False)
    except (RuntimeError, subprocess.CalledProcessError) as e:
        said = _compiler_said(e)
        if said is None:
            raise
        raise KernelUnusable(_remember_failure(
            failure, f"the ternary kernel did not build ({said})")) from None
    library = folder / f"{build}{LIB_EXT}"
    record = root / f"{name}.json"
    written = record.with_suffix(".json.tmp")
    written.write_text(json.dumps({"library": f"{build}/{library.name}",
                                   "size": library.stat().st_size, "sha256": _sha256(library)}))
    os.replace(written, record)
    return library


@contextlib.contextmanager
def _torch_quiet():
    """cpp_extension logs its checks of the compiler as multi-line warnings (with a traceback
    where the compiler fails them) and lets the compiler write to stderr as it checks it: the
    one-line reason says what matters."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    was_disabled, torch_log.disabled = torch_log.disabled, True
    sys.stderr.flush()
    stderr = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(stderr, 2)
        os.close(stderr)
        torch_log.disabled = was_disabled


# What ninja says around the compiler's output, and the compiler's lines that are not the error:
# where it happened ("x.cpp: In function 'f':", "In file included from"), warnings, notes, and
# the quoted source under them.
_NINJA_LINE = re.compile(r"^(\[\d+/\d+\] |FAILED: |ninja: |Error building extension )")
_CONTEXT_LINE = re.compile(r"(:$|^\s|: (warning|note): )")


def _compiler_said(error: Exception) -> str | None:
    """The compiler's own first error line where `error` is the compiler failing, else None."""
    if isinstance(error, subprocess.CalledProcessError):  # torch's own check of the compiler
        said = (error.output or b"").decode(errors="replace")
        return first_line(said or error)
    if str(error).startswith("Error building extension"):
        return compiler_error(str(error))
    return None


def compiler_error(output: str) -> str:
    """The compiler's own first error line in torch's "Error building extension" message: not
    ninja's lines, nor the commands ninja echoes."""
    lines = [line for line in output.splitlines() if line.strip()]
    commands = {found.group(1).strip() for line in lines
                if (found := re.search(r"\[\d+/\d+\] (.*)", line))}
    own = [line for line in lines
           if not _NINJA_LINE.match(line) and line.strip() not in commands]
    errors = [line for line in own if not _CONTEXT_LINE.search(line)]
    return (errors or own or [first_line(output)])[0].strip()[:200]


def _compiler_identity() -> list[dict]:
    """The compilers a build runs ($CXX, else the compile check's and torch's defaults): their
    resolved paths, sizes and times, read without running them."""
    from torch.utils.cpp_extension import get_cxx_compiler

    from bitnet_cli.nn.compiled import cxx_compiler
    identity = []
    for compiler in sorted({cxx_compiler(), get_cxx_compiler()}):
        found = shutil.which(compiler)
        if found is None:
            identity.append({"compiler": compiler, "path": None})
            continue
        path = os.path.realpath(found)
        stat = os.stat(path)
        identity.append({"compiler": compiler, "path": path, "size": stat.st_size,
                         "mtime_ns": stat.st_mtime_ns})
    return identity


def _remembered_failure(failure: Path) -> str | None:
    """The reason a compile failed earlier with the compilers this command would run, or None."""
    try:
        remembered = json.loads(failure.read_text())
        if remembered["compilers"] == _compiler_identity():
            return _with_retry(remembered["reason"], failure)
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _remember_failure(failure: Path, reason: str) -> str:
    """`reason`, kept for later commands when the compiler is there (so it ran and failed) and
    the cache folder takes the note; with how to try again then."""
    identity = _compiler_identity()
    if any(compiler["path"] is None for compiler in identity):
        return reason  # a compiler to install: nothing ran, nothing to remember
    try:
        failure.parent.mkdir(parents=True, exist_ok=True)
        failure.write_text(json.dumps({"compilers": identity, "reason": reason}))
    except OSError:
        return reason
    return _with_retry(reason, failure)


def _with_retry(reason: str, failure: Path) -> str:
    return f"{reason}; not tried again until the compiler changes (delete {failure} to retry)"
