"""The package's layout, written down once: folders by idea, each importing only the folders
below it, no import circle, no file name twice, every folder saying what it holds."""

import ast
import collections
from pathlib import Path

import bitnet_cli

PACKAGE = Path(bitnet_cli.__file__).parent
# Lowest first: a module may import its own folder and the folders before it, never after.
LAYERS = ["errors", "config", "store", "report", "data", "nn", "tasks", "training", "use",
          "serve", "bench", "ui", "cli"]
TOP = {"bitnet_cli.__main__"}  # the entry point sits above everything


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """The bitnet_cli modules a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names if a.name.startswith("bitnet_cli"))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bitnet_cli"):
            for alias in node.names:  # `from bitnet_cli.ui import tables` imports a module
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
    return names


def _layer(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else 0  # bitnet_cli itself: __version__


def test_every_module_sits_in_a_layer():
    for module in MODULES:
        if module not in TOP and module != "bitnet_cli":
            assert module.split(".")[1] in LAYERS, f"{module} is in no layer of LAYERS"


def test_no_module_imports_a_higher_layer():
    upward = [f"{module} ({LAYERS[_layer(module)] if _layer(module) < len(LAYERS) else 'top'}) "
              f"imports {target} ({LAYERS[_layer(target)]})"
              for module, path in MODULES.items() for target in _imports(path)
              if _layer(target) > _layer(module)]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {module: _imports(path) & set(MODULES) for module, path in MODULES.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), list(graph[start])
        while todo:
            node = todo.pop()
            if node == goal:
                return True
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        return False

    circles = [module for module in graph if reaches(module, module)]
    assert not circles, f"modules on an import circle: {', '.join(sorted(circles))}"


def test_no_file_name_twice():
    names = collections.Counter(p.name for p in MODULES.values() if p.name != "__init__.py")
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    twice = [name for name, count in names.items() if count > 1 or name[:-3] in folders]
    assert not twice, f"file names used twice (or beside a folder of that name): {twice}"


def test_every_folder_says_what_it_holds():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "bitnet_cli":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc) > 80, f"{path} needs a docstring saying what lives there"


def test_modules_and_functions_stay_readable():
    """One idea per module (at most 300 lines), one screen per function (at most 80)."""
    too_long = []
    for path in MODULES.values():
        source = path.read_text()
        if len(source.splitlines()) > 300:
            too_long.append(f"{path.relative_to(PACKAGE)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    too_long.append(f"{path.relative_to(PACKAGE)}:{node.name}: {lines} lines")
    assert not too_long, "\n".join(too_long)
