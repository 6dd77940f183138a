"""No import circle inside vlm_tune: every module's imports (top-level, function-level, relative) form a DAG.

The graph is read from the source with `ast`, not by importing: an edge A → B for each `import`/`from ... import`
in A that names the vlm_tune module B (`from vlm_tune.x import y` is an edge to `vlm_tune.x.y` when that is a
module, else to `vlm_tune.x`). A circle is named module by module in the failure message.

The family registry (`families/__init__.py`) imports the family modules; they import only `families/base.py`
(the `Family` record) and `families/pinned.py`, never the registry, so the registry can list them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlm_tune

PACKAGE = Path(vlm_tune.__file__).parent


def module_names(root: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package: dotted name → file (a package is named by its `__init__.py`)."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The vlm_tune modules that module `name` (at `path`) imports, wherever in the file the import is."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # each name: the submodule it names, else the module it comes from
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import vlm_tune.x.y` where y is a name: vlm_tune.x
                target = target.rpartition(".")[0]
            if target.startswith("vlm_tune") and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module → the vlm_tune modules it imports."""
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph is a DAG (depth-first, three colours)."""
    state: dict[str, int] = {}  # absent: unvisited, 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_graph_sees_relative_function_level_and_package_imports(tmp_path):
    pkg = tmp_path / "vlm_tune"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("from vlm_tune.sub.b import NAME\n")
    (pkg / "sub" / "b.py").write_text("import vlm_tune.a\nNAME = 1\n")
    (pkg / "sub" / "c.py").write_text(
        "from .. import a\nfrom . import NAME, b\nfrom vlm_tune.sub.b import X\n"
    )
    modules = module_names(pkg)
    graph = {name: imports_of(name, path, set(modules)) for name, path in modules.items()}
    assert graph == {
        "vlm_tune": set(),
        "vlm_tune.a": {"vlm_tune.sub.b"},
        "vlm_tune.sub": {"vlm_tune.sub.b"},
        "vlm_tune.sub.b": {"vlm_tune.a"},
        "vlm_tune.sub.c": {"vlm_tune.a", "vlm_tune.sub", "vlm_tune.sub.b"},
    }
    assert find_cycle(graph) == ["vlm_tune.a", "vlm_tune.sub.b", "vlm_tune.a"]
    assert find_cycle({"x": {"y"}, "y": set()}) is None


def test_no_import_circle_in_vlm_tune():
    graph = import_graph()
    assert "vlm_tune.data.collator_base" in graph["vlm_tune.data.prefix_lm"]  # the graph is the real one
    assert "vlm_tune.data.collate" not in graph["vlm_tune.data.prefix_lm"]
    for family in ("smolvlm", "qwen", "gemma3", "internvl", "paligemma", "lfm2vl"):  # they list nothing back
        assert "vlm_tune.families" not in graph[f"vlm_tune.families.{family}"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
