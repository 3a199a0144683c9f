"""The CPU kernel's arithmetic alone (tests/kernel_exact.cpp, no torch): every code path the CPU
has gives the exact integer sums, and the portable path's floats bit for bit. Natively on this
machine's paths, and on ARM's under qemu-user: a Cortex-A53 (NEON without the dot-product
extension) and qemu's `max` CPU (with it)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CPU = ROOT / "bitnet_cli" / "nn" / "cpu"
SOURCES = [ROOT / "tests" / "kernel_exact.cpp"] + [CPU / name for name in
                                                   ("portable.cpp", "x86.cpp", "arm.cpp")]
# As the kernel is built: no FMA contraction (the floats' one order of operations).
FLAGS = ["-std=c++17", "-O2", "-ffp-contract=off"]
ARM_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64")


def build(compiler: str, folder: Path, *extra: str) -> Path:
    program = folder / "kernel_exact"
    built = subprocess.run([compiler, *FLAGS, *extra, *map(str, SOURCES), "-o", str(program)],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    return program


def checked_paths(command: list[str]) -> list[str]:
    """The paths the program checked, in its order; it must have found them all exact."""
    ran = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    lines = ran.stdout.splitlines()
    assert all(re.fullmatch(r"\w+: ok \(\d+ cases\)", line) for line in lines), ran.stdout
    return [line.split(":")[0] for line in lines]


@pytest.mark.engines
def test_every_path_of_this_cpu_is_exact(tmp_path, ternary_kernel):
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build tests/kernel_exact.cpp with")
    paths = checked_paths([str(build("g++", tmp_path))])
    assert paths[-1] == "portable"
    if ternary_kernel is not None:  # the kernel offers no path the program did not check
        offered = {ternary_kernel.path_name(number) for number in ternary_kernel.isas()}
        assert offered <= set(paths)


@pytest.fixture(scope="module")
def arm_program(tmp_path_factory):
    missing = [tool for tool in ARM_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: apt-get install qemu-user g++-aarch64-linux-gnu")
    return build("aarch64-linux-gnu-g++", tmp_path_factory.mktemp("arm"), "-static")


@pytest.mark.arm
@pytest.mark.parametrize("cpu,paths", [("cortex-a53", ["neon", "portable"]),
                                       ("max", ["neondot", "neon", "portable"])])
def test_every_arm_path_is_exact_under_qemu(arm_program, cpu, paths):
    assert checked_paths(["qemu-aarch64", "-cpu", cpu, str(arm_program)]) == paths
