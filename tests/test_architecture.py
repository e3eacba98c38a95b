"""The layout of docs/architecture.md, kept honest: each stage of `compressor/` imports only
from the stages below it, and the library never prints."""

from __future__ import annotations

import ast
from pathlib import Path

import compressor

STAGES = ("errors", "core", "methods", "io", "training", "options", "recipes", "workflows")
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
