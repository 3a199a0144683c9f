"""The 2-bit kernel as the engines get it: built once per process (kernel_build.py), every entry
point checked on every code path this CPU has (kernel_check.py), and the fastest path that
passes used from then on, or the one-line reason there is no kernel (the int8 engine decodes).

A path is offered only where the CPU has every feature it needs (cpu/kernels.h numbers and names
them: avx512, avxvnni, avx2 on x86, neondot, neon on ARM, portable anywhere), so no path is ever
an illegal instruction. BITNET_KERNEL=<path> caps the paths at that one, as another CPU would
have them: the tests run this way to prove the other paths.
"""

from __future__ import annotations

import os
import sys

import torch

from bitnet_cli.nn.kernel_build import KernelUnusable, build_kernel
from bitnet_cli.nn.kernel_check import self_check

FORCE = "BITNET_KERNEL"
_loaded: dict[str, object] = {}  # "ops" -> the module, or "why" -> the reason it is not there


def path_numbers(ops) -> dict[str, int]:
    """The kernel's own numbering of its code paths (cpu/kernels.h), by name."""
    numbers, path = {}, 1
    while name := ops.path_name(path):
        numbers[name] = path
        path += 1
    return numbers


def ternary_ops(notice=lambda text: print(text, file=sys.stderr)):
    """(the kernel's ops, torch.ops.bitnet_ternary, None), or (None, why it cannot be used
    here). Built and checked at most once per process; `notice` hears the one line a first
    compile takes, and the one line a path that fails its check costs."""
    if "ops" not in _loaded and "why" not in _loaded:
        try:
            _loaded["ops"] = _checked(build_kernel(notice), notice)
        except KernelUnusable as e:
            _loaded["why"] = str(e)
    return _loaded.get("ops"), _loaded.get("why")


def _checked(ops, notice):
    """The ops, limited to the fastest path that passes every check (and BITNET_KERNEL)."""
    paths = path_numbers(ops)
    forced = os.environ.get(FORCE, "").strip().lower()
    if forced and forced not in paths:
        raise KernelUnusable(f"{FORCE}={forced} is not a kernel path (one of "
                             f"{', '.join(paths)})")
    ops.limit_paths(paths[forced] if forced else max(paths.values()))
    if forced and paths[forced] not in ops.isas():
        raise KernelUnusable(f"{FORCE}={forced}: this CPU lacks that path's instructions")
    if not ops.threaded() and torch.get_num_threads() > 1:
        notice("note: the 2-bit kernel runs on one thread here (built without OpenMP)")
    failed = []
    for path in ops.isas():  # fastest first
        wrong = self_check(ops, path)
        if wrong is None:
            ops.limit_paths(path)
            if failed:
                notice(f"note: the 2-bit kernel's {failed[0]}; using its {ops.path_name(path)} "
                       "path")
            return ops
        failed.append(wrong)
    raise KernelUnusable(failed[0])
