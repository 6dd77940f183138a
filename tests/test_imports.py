"""No import circle inside vlm_tune: every module's imports (top-level, function-level, relative) form a DAG.

The graph is read from the source with `ast`, not by importing: an edge A → B for each `import`/`from ... import`
in A that names the vlm_tune module B (`from vlm_tune.x import y` is an edge to `vlm_tune.x.y` when that is a
module, else to `vlm_tune.x`). A circle is named module by module in the failure message.

One circle is known and listed (`KNOWN_CIRCLE`), so that nothing new joins it: the family registry
(`families/__init__.py` imports each family module for `FAMILIES`; each imports `Family` and the processor
loaders back from it) tied to the stand-in builders (`tiny.py` <-> `families/smolvlm.py`, `real_decoder.py`,
`smolvlm2.py`) and `runtime.py` (image backend <-> `family_of_name`). Cutting it moves the `Family` record and the
loaders out of `families/__init__.py` and the stand-ins into their own subpackage (issue 23, items 1 and 2); the
list then shrinks (a listed module that is no longer on the circle fails the test until it is removed).
"""

from __future__ import annotations

import ast
from pathlib import Path

import vlm_tune

PACKAGE = Path(vlm_tune.__file__).parent
KNOWN_CIRCLE = frozenset(
    {
        "vlm_tune.families",
        "vlm_tune.families.gemma3",
        "vlm_tune.families.image_only",
        "vlm_tune.families.internvl",
        "vlm_tune.families.lfm2vl",
        "vlm_tune.families.paligemma",
        "vlm_tune.families.pinned",
        "vlm_tune.families.qwen",
        "vlm_tune.families.smolvlm",
        "vlm_tune.real_decoder",
        "vlm_tune.runtime",
        "vlm_tune.smolvlm2",
        "vlm_tune.tiny",
    }
)


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
    outside_known = {
        m: {t for t in ts if not (m in KNOWN_CIRCLE and t in KNOWN_CIRCLE)} for m, ts in graph.items()
    }
    cycle = find_cycle(outside_known)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_the_known_circle_is_listed_exactly():
    graph = import_graph()
    inside = {m: graph.get(m, set()) & KNOWN_CIRCLE for m in KNOWN_CIRCLE}
    off = sorted(m for m in KNOWN_CIRCLE if not _reaches(inside, m, m))
    assert not off, f"no longer on the known circle: remove {off} from KNOWN_CIRCLE"


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    """Whether a path of one or more edges leads from start to goal."""
    seen, todo = set(), list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return False
