"""The layout of docs/architecture.md, kept honest: each stage of `compressor/` imports only
from the stages below it, the library never prints, and the doc's table names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import compressor

STAGES = (
    "errors", "core", "methods", "io", "training", "pipelines", "options", "recipes", "workflows",
)  # fmt: skip
"""Bottom to top; `dln` (the research core) imports only `errors`, and only `workflows`
(the demo) imports `dln`."""
ROOT = Path(compressor.__file__).parent


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("compressor"):
            found.append(node.module)
            if node.module == "compressor":
                found += [f"compressor.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("compressor")]
    return found


def _stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_each_stage_imports_only_from_the_stages_below():
    rank = {s: i for i, s in enumerate(STAGES)}
    wrong = []
    for path in ROOT.rglob("*.py"):
        stage = path.relative_to(ROOT).parts[0].removesuffix(".py")
        allowed = {"errors", "dln"} if stage == "dln" else set(STAGES[: rank.get(stage, 0) + 1])
        if stage == "workflows":
            allowed.add("dln")
        if stage not in rank and stage != "dln":
            continue
        wrong += [f"{path.name}: {m}" for m in _imports(path) if _stage(m) not in allowed | {None}]
    assert wrong == []


def test_the_library_never_prints():
    calls = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in ROOT.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
    ]
    assert calls == []


DOC = ROOT.parent / "docs" / "architecture.md"


def _table_rows() -> dict[str, str]:
    """docs/architecture.md's table: the first cell without backticks (`core/`, `cli/`,
    `compressor/errors.py`) -> the rest of its row."""
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) > 1 and not set(cells[0]) <= {"-", ":"}:
            rows[cells[0].strip("`")] = " | ".join(cells[1:])
    return rows


def _named(row: str) -> set[str]:
    """The names in backticks in a row, `.py` dropped: `linalg`, `svd.py` -> linalg, svd."""
    quoted = re.findall(r"``\s?(.+?)\s?``|`([^`]+)`", row)
    return {(double or single).removesuffix(".py") for double, single in quoted}


def _modules() -> list[tuple[str, str]]:
    """(path, the table row it belongs to) for every module of compressor/ and cli/:
    compressor/errors.py -> its own row, compressor/core/linalg.py -> `core/`, cli/x.py ->
    `cli/`."""
    found = []
    for package in (ROOT, ROOT.parent / "cli"):
        for path in sorted(package.rglob("*.py")):
            if path.name == "__init__.py":
                continue
            rel = path.relative_to(package)
            if package.name == "cli":
                row = "cli/"
            elif len(rel.parts) == 1:
                row = f"compressor/{path.name}"
            else:
                row = f"{rel.parent.as_posix()}/"
            found.append((path.relative_to(ROOT.parent).as_posix(), row))
    return found


def test_every_module_is_named_in_the_architecture_doc():
    """A module belongs to its folder's row, named in backticks (`linalg` or `svd.py`)."""
    rows = _table_rows()
    missing = [
        path
        for path, row in _modules()
        if not (row.endswith(".py") and row in rows)
        and Path(path).stem not in _named(rows.get(row, ""))
    ]
    assert not missing, f"name these in the table of docs/{DOC.name}: {missing}"


def test_every_file_the_architecture_doc_names_exists():
    modules = {(row, Path(path).stem) for path, row in _modules()}
    rows = _table_rows()
    stale = [
        f"{row} {name}"
        for row, text in rows.items()
        if row.endswith("/")
        for name in re.findall(r"(?<!`)`(\w+)\.py`", text)
        if (row, name) not in modules
    ]
    assert not stale, f"docs/{DOC.name} names files that do not exist: {stale}"


SOURCE = (ROOT, ROOT.parent / "cli")
"""The code the size and import rules below hold for: the library and the command line."""


def _source_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module under `SOURCE`."""
    found = {}
    for top in SOURCE:
        for path in top.rglob("*.py"):
            parts = path.relative_to(top.parent).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _targets(node: ast.AST, known: dict[str, Path]) -> list[str]:
    """The modules of `known` an import statement loads (a name imported from a package is
    the submodule when there is one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    if not isinstance(node, ast.ImportFrom) or node.level or node.module not in known:
        return []
    subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
    return subs or [node.module]


def test_no_module_imports_in_a_loop():
    # every import counts, also one inside a function: a lazy import is still a dependency
    known = _source_modules()
    graph = {
        name: sorted(
            {t for node in ast.walk(ast.parse(path.read_text())) for t in _targets(node, known)}
            - {name}
        )
        for name, path in known.items()
    }
    loops, done = [], set()

    def visit(name: str, path: tuple[str, ...]) -> None:  # depth first, the path held
        for nxt in graph[name]:
            if nxt in path:
                loops.append(" -> ".join((*path[path.index(nxt) :], nxt)))
            elif nxt not in done:
                visit(nxt, (*path, nxt))
        done.add(name)

    for name in graph:
        if name not in done:
            visit(name, (name,))
    assert loops == []


def test_no_file_over_450_lines_and_no_function_over_80():
    too_long = []
    for path in _source_modules().values():
        text = path.read_text()
        if len(text.splitlines()) > 450:
            too_long.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    too_long.append(f"{path.name}:{node.name}: {length} lines")
    assert too_long == []
