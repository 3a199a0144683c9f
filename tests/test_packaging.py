"""What pip installs is what the code imports, and the extras say what the README says."""

import ast
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import bitnet_cli

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")
ROOT = Path(bitnet_cli.__file__).parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DISTRIBUTIONS = {"llama_cpp": "llama-cpp-python"}  # import name -> name on PyPI, where they differ


def _requirements(extra=None) -> list[Requirement]:
    found = PROJECT["optional-dependencies"][extra] if extra else PROJECT["dependencies"]
    return [Requirement(r) for r in found]


def test_every_package_the_code_imports_is_declared():
    imported = set()
    for path in (ROOT / "bitnet_cli").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = {m for m in imported if m not in sys.stdlib_module_names and m != "bitnet_cli"}
    declared = {r.name.lower() for r in _requirements()}
    declared |= {r.name.lower() for extra in PROJECT["optional-dependencies"]
                 for r in _requirements(extra)}
    missing = {m for m in third_party if DISTRIBUTIONS.get(m, m).lower() not in declared}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_the_hf_extra_installs_a_transformers_that_loads_both_export_formats():
    """The README: hf loads in 4.52 and later, hf-packed in 4.52-4.57 and 5.13 or later."""
    transformers = next(r for r in _requirements("hf") if r.name == "transformers")
    for version, loads in [("4.51.3", False), ("4.52.0", True), ("4.57.1", True),
                           ("5.0.0", False), ("5.12.2", False), ("5.13.0", True), ("6.1", True)]:
        assert transformers.specifier.contains(version) is loads, version


def test_the_wheel_carries_the_kernel_source(tmp_path):
    """pipx installs a wheel: the 2-bit kernel's C++ source must be in it, to build on first use,
    and the chat page `bitnet serve` sends."""
    import subprocess
    import zipfile
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    from bitnet_cli.nn.kernel_build import HEADERS, SOURCES
    inside = set(zipfile.ZipFile(wheel).namelist())
    for path in SOURCES + HEADERS:
        assert f"bitnet_cli/nn/cpu/{path.name}" in inside, path.name
    assert "bitnet_cli/serve/page.html" in inside  # bitnet serve's chat page
