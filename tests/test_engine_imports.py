"""The engine boundary (docs/engine.md): the front ends import only the engine's public names, the
project's modules import one another without a cycle, and importing the engine loads neither the
command line nor the web app. Read from the source (``ast``), so every import counts, including
those inside functions and under ``TYPE_CHECKING``."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGES = ("models", "runners", "utils", "scripts")
#: The front ends and, for each, the project modules it may import besides ``runners.engine``'s
#: public names: its own front-end modules, and the evaluation's measuring instruments.
FRONT_ENDS = {
    "main.py": ("runners.boundary_diffusion",),
    "runners/boundary_diffusion.py": ("runners.settings", "runners.app"),
    "runners/settings.py": (),
    "runners/app.py": ("runners.app_state",),
    "runners/app_state.py": (),
    "scripts/benchmark.py": (),
    "scripts/benchmark_app.py": ("runners.app", "runners.app_state"),
    "scripts/benchmark_folder_memory.py": (),
    "scripts/benchmark_distributed.py": (),
}
# Not front ends: scripts/benchmark_fit.py and scripts/benchmark_loading.py time one component of
# the numerical core or of model loading (fit_attributes on a synthetic cache, checkpoint readers)
# and import that component directly; tools that write data or weights (make_*, train*) likewise.
EVALUATION_INSTRUMENTS = ("scripts.evaluation", "utils.core.morphometry", "utils.core.edit_measures", "utils.faces",
                          "utils.io.plots", "utils.io.files", "utils.io.images",
                          "utils.core.discovery")


def module_name(path: Path) -> str:
    relative = path.relative_to(REPO).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def project_files() -> list[Path]:
    files = [REPO / "main.py"]
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return files


def imports(path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """(module, names imported from it) of every import statement in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path).split(".")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here[:len(here) - node.level + (1 if path.name == "__init__.py" else 0)]
                base = ".".join([*package, base] if base else package)
            found.append((base, tuple(alias.name for alias in node.names)))
    return found


def in_project(module: str) -> bool:
    return module == "main" or module.split(".")[0] in PACKAGES


def engine_public_names() -> set[str]:
    tree = ast.parse((REPO / "runners" / "engine" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("runners/engine/__init__.py has no __all__")


def front_end_files() -> dict[Path, tuple[str, ...]]:
    files = {REPO / name: allowed for name, allowed in FRONT_ENDS.items() if (REPO / name).is_file()}
    for path in [REPO / "scripts" / "evaluate_edits.py", *sorted((REPO / "scripts" / "evaluation").glob("*.py"))]:
        if path.is_file():
            files[path] = EVALUATION_INSTRUMENTS
    return files


@pytest.mark.parametrize("path", list(front_end_files()), ids=lambda p: str(p.relative_to(REPO)))
def test_front_ends_import_only_the_engines_public_names(path):
    allowed, public = front_end_files()[path], engine_public_names()
    for module, names in imports(path):
        if not in_project(module):
            continue
        if module == "runners.engine":
            assert set(names) <= public, f"{path.name} imports {sorted(set(names) - public)} from runners.engine"
            continue
        assert any(module == a or module.startswith(a + ".") for a in allowed), \
            f"{path.relative_to(REPO)} imports {module}, not the engine's public names"


def test_the_project_has_no_import_cycle():
    graph = {}
    for path in project_files():
        name = module_name(path)
        targets = set()
        for module, names in imports(path):
            if not in_project(module):
                continue
            # ``from package import name`` may import a submodule: count it when one exists
            subs = {f"{module}.{n}" for n in names if (REPO / Path(*f"{module}.{n}".split("."))).with_suffix(".py").is_file()
                    or (REPO / Path(*f"{module}.{n}".split(".")) / "__init__.py").is_file()}
            targets |= subs or {module}
        graph[name] = {t for t in targets if t != name}
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` (module -> imported modules, each also importing its packages), or None."""
    def parents(module):
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts)) if ".".join(parts[:i]) in graph}

    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ()) | {p for t in graph.get(node, ()) for p in parents(t)} - {node}):
            if nxt not in graph or nxt in parents(node):
                continue  # a package's __init__ running while its own submodule loads is not a cycle
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_importing_the_engine_loads_neither_the_command_line_nor_the_app():
    code = ("import sys, runners.engine; print(sorted(m for m in sys.modules if m in ('main', 'gradio') or "
            "m.startswith(('runners.app', 'runners.boundary_diffusion', 'runners.settings'))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
