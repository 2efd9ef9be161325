"""The shape of the house: files and functions stay small, imports point down only,
and the job body names no single strategy (the layout module composes them)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "shardwise"
MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 80
# the modules of one strategy each: only layout.py composes them
STRATEGIES = {f"shardwise.parallel.{m}" for m in ("data", "tensor", "vertical", "spatial", "pipeline", "zero")}
STRATEGIES |= {"shardwise.parallel.param_server"}
# from the top down: a module may import only modules of a later entry, or of none listed
# (the package's lower parts: parallel/, comm/, train/, data/, ... which import none of these)
LAYERS = [
    ("shardwise", "shardwise.__main__"),
    ("shardwise.cli",),
    ("shardwise.words_cli", "shardwise.serve.command"),  # `words`' and `serve`'s command lines, over the API
    ("shardwise.api",),
    ("shardwise.launch", "shardwise.worker"),
    ("shardwise.serve.ranks",),  # a serving rank: the layout a job builds, behind the front
]
LAYERS += [("shardwise.job",), ("shardwise.roles",), ("shardwise.layout",)]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every shardwise module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("shardwise"):
            if node.module != "shardwise":  # `from shardwise import procs` imports procs, not the package's own code
                found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("shardwise")}
    return found & set(_modules())


def _layer(module: str) -> int:
    for i, names in enumerate(LAYERS):
        if module in names:
            return i
    return len(LAYERS)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_files_and_functions_stay_small(module):
    path = _modules()[module]
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.name}: {lines} lines, split it along a seam"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}: {node.name} has {length} lines"


def test_imports_point_down_only():
    upward = []
    for module, path in _modules().items():
        for imported in _imports(path):
            if _layer(imported) < len(LAYERS) and _layer(imported) <= _layer(module) and imported != module:
                upward.append(f"{module} imports {imported}")
    # the worker runs as a process: only the API imports it, to run as a rank torchrun started
    importers = [m for m, p in _modules().items() if "shardwise.worker" in _imports(p)]
    upward += [f"{m} imports shardwise.worker" for m in importers if m != "shardwise.api"]
    assert not upward, upward


def test_the_job_names_no_single_strategy():
    for module in ("shardwise.worker", "shardwise.job", "shardwise.roles"):
        named = _imports(_modules()[module]) & STRATEGIES
        assert not named, f"{module} imports {sorted(named)}: ask the Layout instead"
    # and layout.py is where every strategy is applied
    assert STRATEGIES <= _imports(_modules()["shardwise.layout"])
