"""The docs teach the public API only: `mesh` (its `__all__`), `mesh.a2a`, `mesh.authz`,
`mesh.schedules`, `mesh.tools` and `mesh.testing` (its fixtures and faults modules too).

Everything else under `mesh/` is implementation a newcomer should not need; `mesh._internal` in
particular may change without notice (its package docstring says so).
"""

from __future__ import annotations

import ast
import importlib

import pytest

from tests.docs.blocks import CHECKED, blocks

PUBLIC_MODULES = {
    "mesh",
    "mesh.a2a",
    "mesh.authz",
    "mesh.schedules",
    "mesh.tools",
    "mesh.testing",
    "mesh.testing.fixtures",
    "mesh.testing.faults",
}


def _python_blocks() -> list[tuple[str, str]]:
    return [(b.id, b.code) for page in CHECKED for b in blocks(page) if b.lang == "python"]


@pytest.mark.parametrize(("where", "code"), _python_blocks(), ids=lambda v: str(v)[:40])
def test_docs_import_only_the_public_api(where: str, code: str) -> None:
    tree = ast.parse(code)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mesh":
            assert node.module in PUBLIC_MODULES, f"{where}: imports {node.module}"
            if node.module in ("mesh", "mesh.a2a"):
                public = set(importlib.import_module(node.module).__all__)
                names = {a.name for a in node.names}
                assert names <= public, f"{where}: {names - public}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mesh":
                    assert alias.name in PUBLIC_MODULES, f"{where}: imports {alias.name}"


@pytest.mark.parametrize("module", ["mesh", "mesh.a2a", "mesh.authz", "mesh.testing", "mesh.tools"])
def test_every_public_name_resolves(module: str) -> None:
    package = importlib.import_module(module)
    for name in package.__all__:
        assert getattr(package, name) is not None, f"{module}.{name}"
