"""The 2-bit ternary kernel (ternary_kernel.cpp), compiled on first use and then reused.

It is a torch C++ extension (ops registered as torch.ops.bitnet_ternary) built with the
machine's own compiler into bitnet's cache folder (or $TORCH_EXTENSIONS_DIR), under a name that
covers the source, the torch and Python versions and the CPU architecture, so a stale build is
never found. A file lock lets one process build while others wait for it. What
loads is checked against exact integer sums on every kernel path the CPU has before any model
uses it; a build that fails to load is removed and built once more.

Anything that stops it (no compiler, a failed build, a wrong answer) is a reason in one line:
the caller decodes with the int8 engine instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = [HERE / "ternary_kernel.cpp", HERE / "decode_step.cpp"]
HEADERS = [HERE / "ternary_kernel.h"]
# No -ffast-math or FMA contraction: the sums are integers, but the rescale must round as torch
# does. -fopenmp: at::parallel_for is inlined into the kernel and runs on torch's own OpenMP
# threads (GNU OpenMP, loaded with torch on Linux) only when compiled with it; elsewhere the
# kernel runs on one thread rather than bring a second OpenMP runtime into the process.
FLAGS = ["-O3", "-ffp-contract=off"] + (["-fopenmp"] if sys.platform == "linux" else [])
PATHS = {"portable": 1, "avx2": 2, "vnni": 3}  # the kernel's own numbering of its code paths
_loaded: dict[str, object] = {}  # "ops" -> the module, or "why" -> the reason it is not there


def build_key() -> str:
    versions = f"{torch.__version__} {sys.version_info[:2]} {platform.machine()} {FLAGS}"
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS) + versions.encode()
    return hashlib.sha256(text).hexdigest()[:16]


def ternary_ops(notice=lambda text: print(text, file=sys.stderr)):
    """(the kernel's ops, torch.ops.bitnet_ternary, None), or (None, why it cannot be used
    here). Built at most once per process; `notice` hears the one line a first compile takes."""
    if "ops" not in _loaded and "why" not in _loaded:
        try:
            _loaded["ops"] = _build_and_check(notice)
        except _Unusable as e:
            _loaded["why"] = str(e)
    return _loaded.get("ops"), _loaded.get("why")


class _Unusable(Exception):
    pass


def _build_and_check(notice):
    from bitnet_cli.nn.compiled import compiler_problem
    problem = compiler_problem(torch.device("cpu"))
    if problem:
        raise _Unusable(problem.replace(" for torch.compile", ""))
    from filelock import FileLock

    name = f"bitnet_ternary_{build_key()}"
    folder = kernels_dir() / name
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            ops = _import_built(name, folder, notice)
            if ops is None:
                ops = _load(name, folder)
    except (ImportError, OSError, RuntimeError) as e:  # no room to build, a compiler error
        raise _Unusable(f"the ternary kernel did not build ({_first_line(e)})") from None
    wrong = self_check(ops)
    if wrong:
        raise _Unusable(wrong)
    if hasattr(torch.library, "register_fake"):  # torch 2.4+: the op's shape, for torch.compile
        torch.library.register_fake("bitnet_ternary::ternary_linear",
                                    lambda x, packed, scale, path: x.new_empty((x.shape[0],
                                                                                packed.shape[0])))
    return ops


def _import_built(name: str, folder: Path, notice):
    """The module built earlier in `folder`, or None when it must be compiled (then the one
    line says so). A build that does not import (cut short, damaged) is removed first."""
    library = next((p for p in folder.glob(f"{name}*") if p.suffix in (".so", ".pyd", ".dll")),
                   None)
    if library is not None:
        try:
            torch.ops.load_library(str(library))
            return torch.ops.bitnet_ternary
        except (ImportError, OSError, RuntimeError):
            notice("note: the built 2-bit ternary kernel does not load; compiling it again "
                   "(a few seconds)")
            shutil.rmtree(folder, ignore_errors=True)
    else:
        notice("note: compiling bitnet's 2-bit ternary kernel, once for this machine "
               "(a few seconds)")
    return None


def kernels_dir() -> Path:
    """Where builds live: $TORCH_EXTENSIONS_DIR if the user chose it, else bitnet's cache."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    from bitnet_cli.data.shards import cache_dir
    return cache_dir() / "kernels"


def _load(name: str, folder: Path):
    from torch.utils.cpp_extension import load
    folder.mkdir(parents=True, exist_ok=True)
    # cpp_extension finds ninja on PATH: the one pip installed beside this Python counts too.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    if importlib.util.find_spec("ninja") is None and shutil.which("ninja") is None:
        raise RuntimeError("ninja is not installed (pip install ninja)")
    load(name=name, sources=[str(path) for path in SOURCES], build_directory=str(folder), extra_cflags=FLAGS,
         is_python_module=False, verbose=False)
    return torch.ops.bitnet_ternary


def self_check(ops) -> str | None:
    """Why a kernel (the ternary sums, the int8 head's) gives a wrong sum on some path, or None:
    random codes and inputs in odd shapes, every path this CPU has, against int64 products."""
    generator = torch.Generator().manual_seed(0)
    for rows, k, n in ((1, 1, 1), (3, 255, 5), (5, 257, 9), (17, 1000, 33)):
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=generator)
        x = torch.randint(-127, 128, (rows, k), dtype=torch.int8, generator=generator)
        head = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=generator)
        exact, head_exact = (x.long() @ codes.long().T).int(), (x.long() @ head.long().T).int()
        packed = ops.pack(codes)
        for path in ops.isas():
            name = next(k for k, v in PATHS.items() if v == path)
            if not torch.equal(ops.ternary_mm(x, packed, path), exact):
                return f"the ternary kernel's {name} path gives wrong sums on this CPU"
            if not torch.equal(ops.int8_mm(x, head, path), head_exact):
                return f"the int8 head kernel's {name} path gives wrong sums on this CPU"
    return None


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(error).__name__
