"""The floor plan, checked: imports flow one way (README, "Layout").

    agents ──▶ mesh core ◀── coordinator          shell (mesh.cli, mesh.console, mesh.dev,
                                                     │      mesh.testing)
                                                     └─▶ anything

The library core never imports `coordinator`, `agents` or the shell, not even lazily inside a
function; `coordinator` and `agents` never import each other or the shell. Every import
statement counts, wherever it sits in a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHELL = ("mesh.cli", "mesh.console", "mesh.dev", "mesh.testing")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            # `from mesh import cli` imports the module mesh.cli
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


def _layer(module: str) -> str:
    if _within(module, SHELL):
        return "shell"
    return module.split(".", 1)[0]  # mesh (core) | coordinator | agents


FORBIDDEN = {
    "mesh": ("coordinator", "agents", *SHELL),
    "coordinator": ("agents", *SHELL),
    "agents": ("coordinator", *SHELL),
}


def _violations() -> list[str]:
    bad: list[str] = []
    for top in ("mesh", "coordinator", "agents"):
        for path in sorted((ROOT / top).rglob("*.py")):
            layer = _layer(_module_name(path))
            if layer == "shell":
                continue
            for line, name in _imports(path):
                if _within(name, FORBIDDEN[layer]):
                    bad.append(f"{path.relative_to(ROOT)}:{line} ({layer}) imports {name}")
    return bad


def test_imports_flow_one_way() -> None:
    assert _violations() == []


@pytest.mark.parametrize(
    ("source", "where", "forbidden"),
    [
        ("from coordinator.ledger import Ledger\n", "mesh/bus.py", "coordinator.ledger"),
        ("def f():\n    import agents.release\n", "mesh/registry.py", "agents.release"),
        ("from mesh.dev import launcher\n", "coordinator/policy.py", "mesh.dev.launcher"),
        ("from ..dev import demo\n", "mesh/a2a/jsonrpc.py", "mesh.dev.demo"),
    ],
)
def test_the_check_sees_every_kind_of_import(source: str, where: str, forbidden: str) -> None:
    """The checker itself: an upward import written any of these ways is found."""
    path = ROOT / where
    names = [name for _, name in _imports(path, source)]
    assert forbidden in names
    layer = _layer(_module_name(path))
    assert any(_within(n, FORBIDDEN[layer]) for n in names)
