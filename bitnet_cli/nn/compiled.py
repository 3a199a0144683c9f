"""When training is compiled, where the compiler's cache lives, and what happens when it cannot be.

`torch.compile` (inductor) fuses the quantizers' and norms' elementwise work into a few kernels.
On two CPU cores that makes the training step 1.15x (tiny shapes) to 1.35x (12M) faster; the
matrix products, most of a CPU step, stay as they are. Compiling costs time once: 10-75 s the
first time a shape is compiled (tiny to 95M, forward and backward), a few seconds once
inductor's cache holds it. The cache lives in bitnet's user cache folder (`BITNET_CACHE` moves
it), so it survives reboots.

The rule for `--compile` left unset: on for CUDA; on for a CPU run of at least COMPILE_MIN_STEPS
steps, where the saving outweighs even a cold first compile (a tiny model saves ~16 ms a step
against ~33 s of compiling); off for shorter runs and on Apple GPUs. The
rule reads the run's configuration only, so a resumed run compiles exactly as it did before and
continues bit for bit.

Without a C++ compiler (inductor writes C++ for the CPU), or when compiling fails for any other
reason, training goes on eagerly after one line saying why.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings

import torch

from bitnet_cli.config.settings import COMPILE_MIN_STEPS
from bitnet_cli.errors import first_line, typed_first_line

_CACHE_SET_BY_USER = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def wants_compile(cfg, device: torch.device) -> bool:
    """The run's --compile, or the rule above where it was left unset."""
    if cfg.compile is not None:
        return cfg.compile
    return device.type == "cuda" or (device.type == "cpu" and cfg.steps >= COMPILE_MIN_STEPS)


def use_bitnet_cache() -> None:
    """Point inductor's cache at bitnet's cache folder, unless the user chose one for it: a
    folder per ATen CPU capability, because inductor's cache key leaves it out, and code
    compiled beside ATen's AVX-512 kernels gave NaN logits when loaded beside its AVX2 ones (a
    home folder shared by two machines, or ATEN_CPU_CAPABILITY set)."""
    if not _CACHE_SET_BY_USER:
        from bitnet_cli.data.shards import cache_dir
        capability = torch.backends.cpu.get_cpu_capability().lower()
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor" / capability)


def cxx_compiler() -> str:
    """The C++ compiler inductor runs on a CPU: $CXX, else g++ (clang++ on macOS)."""
    return os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")


def compiler_problem(device: torch.device) -> str | None:
    """Why inductor cannot compile for `device` here, or None when it can (as far as can be told
    before trying): on a CPU it needs the C++ compiler that $CXX names (g++ by default), and
    that compiler's `--version` to succeed (else its own first line says why)."""
    if device.type != "cpu":
        return None
    compiler = cxx_compiler()
    where = f"CXX={compiler}" if os.environ.get("CXX") else compiler
    try:
        subprocess.run([compiler, "--version"], capture_output=True, check=True, timeout=30,
                       text=True, errors="replace")
    except subprocess.CalledProcessError as e:
        said = (e.stderr or "").strip() or (e.stdout or "").strip()
        return (f"no C++ compiler for torch.compile ({where} --version fails: "
                f"{first_line(said) if said else f'exit status {e.returncode}'})")
    except (OSError, subprocess.SubprocessError):
        return f"no C++ compiler for torch.compile ({where} does not run)"
    return None


def compile_failure(e: Exception) -> str:
    """What the compiler raised, in one line."""
    return f"torch.compile failed ({typed_first_line(e)})"


class TrainingForward:
    """What the training step calls the model through: compiled, or the module itself.

    `run(micro_step, *args)` calls micro_step(forward, *args), which runs one micro-step's
    forward and backward. Inductor compiles the forward on the first call and the backward on
    the first backward, so if that first micro-step fails, it is said in one line through
    `notice`, the gradients it may have left are dropped, and it runs again eagerly, as does
    every later one. A failure after the first micro-step is the model's own and is raised as
    it is."""

    def __init__(self, module: torch.nn.Module, compile: bool, notice):
        self.module, self.notice = module, notice
        if compile:
            # Dynamo's in-process cache keeps the graphs of this process's earlier models and
            # does not guard on module hooks: a graph traced without the distillation's hooks
            # was reused with them, and they never ran. A training traces its own graphs.
            torch._dynamo.reset()
        self.forward = torch.compile(module) if compile else module
        self.settled = False  # whether the compiled module has run a micro-step

    @property
    def compiled(self) -> bool:
        return self.forward is not self.module

    def run(self, micro_step, *args):
        if not self.compiled:
            return micro_step(self.module, *args)
        try:
            with deterministic_kernels():
                out = micro_step(self.forward, *args)
        except Exception as e:  # whatever the compiler raised: go on without it
            if self.settled:
                raise
            self.notice(f"{compile_failure(e)}; training eagerly")
            for p in self.module.parameters():
                p.grad = None
            self.forward = self.module
            out = micro_step(self.forward, *args)
        self.settled = True
        return out


@contextlib.contextmanager
def deterministic_kernels():
    """Around every compiled step. Inductor turns the embedding's gradient into an
    index_put with accumulation, which PyTorch's CPU kernel adds up in parallel, in an order,
    and so to a float sum, that changes from run to run. In deterministic mode the compiler and
    that kernel take their ordered paths, and the same seed gives the same bytes."""
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*")
            yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def training_forward(module: torch.nn.Module, compile: bool, device: torch.device,
                     notice) -> TrainingForward:
    """`module` compiled when `compile` asks for it and a compiler is there; else, after one
    line through `notice` saying why, eager."""
    if compile:
        problem = compiler_problem(device)
        if problem:
            notice(f"{problem}; training eagerly (install one, such as g++, or pass --no-compile)")
            compile = False
        else:
            use_bitnet_cache()
    return TrainingForward(module, compile, notice)
