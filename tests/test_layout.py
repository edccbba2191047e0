"""The engine's layout rules (DESIGN.md), read off the source with `ast`: dependencies point down
(models import only models and kernels: no layers, no loaders; kernels no models; loaders no
layers), no import cycle among the `wan_core` modules (imports inside functions count: a lazy
import is still a dependency, and is how a cycle hides), and no engine file over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "wan_core"
MAX_LINES = 600


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str) -> set[str]:
    """The `wan_core` modules `name` imports anywhere in its file (top level, functions, TYPE_CHECKING
    blocks), resolved to modules: `from .pkg import mod` names the submodule `pkg.mod`."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                found.add(f"{module}.{a.name}" if f"{module}.{a.name}" in MODULES else module)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first walk (empty: the graph is acyclic)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[list[str]] = []

    def visit(u: str) -> None:
        state[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == 1:
                cycles.append(path[path.index(v) :] + [v])
            elif v not in state:
                visit(v)
        path.pop()
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return cycles


def test_the_import_graph_is_read():
    """The walk finds the edges it is meant to find (a reader that saw nothing would pass the rest)."""
    assert len(MODULES) > 30 and "wan_core.models.vae" in MODULES
    assert "wan_core.kernels.vae_forms" in GRAPH["wan_core.models.vae"]  # `from ..kernels import vae_forms`
    assert "wan_core.kernels.vae_kernels" in GRAPH["wan_core.kernels.vae_forms"]  # imported inside functions
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_wan_core():
    assert _cycles(GRAPH) == []


def test_no_engine_file_over_600_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def _reaching(prefix: str, banned: str) -> dict[str, list[str]]:
    return {
        name: sorted(m for m in deps if m == banned or m.startswith(banned + "."))
        for name, deps in GRAPH.items()
        if name.startswith(prefix + ".") and any(m == banned or m.startswith(banned + ".") for m in deps)
    }


def test_models_import_no_layers():
    assert _reaching("wan_core.models", "wan_core.layers") == {}


def test_models_import_no_loading():
    """The models are the plain math: reading files (`from_file` constructors) lives in `loading`."""
    assert _reaching("wan_core.models", "wan_core.loading") == {}


def test_models_import_only_models_and_kernels():
    """DESIGN.md: models import only torch, each other and the kernels' op/attention tables."""
    outside = {
        name: sorted(m for m in deps if not m.startswith(("wan_core.models.", "wan_core.kernels.")))
        for name, deps in GRAPH.items()
        if name.startswith("wan_core.models.")
    }
    assert {name: deps for name, deps in outside.items() if deps} == {}


def test_kernels_import_no_models():
    assert _reaching("wan_core.kernels", "wan_core.models") == {}


def test_loading_imports_no_layers():
    assert _reaching("wan_core.loading", "wan_core.layers") == {}
