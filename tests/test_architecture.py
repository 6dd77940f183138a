"""docs/architecture.md is checked against the code: every path it names exists, its folder map lists every
module of the package, and nothing it lists is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
PATHLIKE = re.compile(r"`((?:vlm_tune|scripts|tests|configs|docs)/[^`\s]*)`")


def folder_map(text: str) -> list[str]:
    """The paths of the folder map (the first ``` block): one entry per line, two spaces per level."""
    block = text.split("```", 2)[1].splitlines()[1:]
    stack: list[tuple[int, str]] = []
    paths = []
    for line in block:
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        paths.append(path)
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def test_the_folder_map_parser():
    text = "x\n```\na/\n  b.py   one\n  c/\n    d.py  two\n  e.py\nf.sh\n```\n"
    assert folder_map(text) == ["a/", "a/b.py", "a/c/", "a/c/d.py", "a/e.py", "f.sh"]


def test_every_path_the_architecture_doc_names_exists():
    text = DOC.read_text()
    named = set(PATHLIKE.findall(text)) | set(folder_map(text))
    assert len(named) > 60  # the doc is the real one
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_folder_map_lists_every_module_of_the_package():
    listed = set(folder_map(DOC.read_text()))
    modules = {
        str(p.relative_to(ROOT))
        for p in (ROOT / "vlm_tune").rglob("*.py")
        if p.name != "__init__.py" or p.parent.name == "families"
    }
    unlisted = sorted(modules - listed)
    assert not unlisted, f"docs/architecture.md's folder map lacks: {unlisted}"
