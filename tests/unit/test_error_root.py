"""One error root: every exception class the product defines descends from MeshError
(mesh/errors.py's docstring), so a caller catches one family and reads `retryable` from it."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from mesh.errors import ConfigError, MeshError, MeshRuntimeError

ROOT = Path(__file__).resolve().parents[2]
# The test kit's fake model server raises this to answer with an HTTP error status: it stands
# for the remote API's failure, and never leaves the fake.
NOT_MESH_ERRORS = {"mesh.testing.fake_anthropic.FakeHTTPError"}


def _exception_classes() -> list[str]:
    found = []
    for top in ("mesh", "coordinator", "agents"):
        for path in sorted((ROOT / top).rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(
                ".__init__"
            )
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and (
                    node.name.endswith(("Error", "Exception"))
                    or any(
                        isinstance(b, ast.Name) and b.id.endswith(("Error", "Exception"))
                        for b in node.bases
                    )
                ):
                    found.append(f"{module}.{node.name}")
    return found


def test_every_exception_class_descends_from_mesh_error() -> None:
    classes = _exception_classes()
    assert len(classes) > 10  # the scan sees them (AgentCallError, LostClaim, …)
    outside = []
    for qualified in classes:
        module, name = qualified.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), name)
        if not issubclass(cls, MeshError) and qualified not in NOT_MESH_ERRORS:
            outside.append(qualified)
    assert outside == []


def test_two_branches() -> None:
    assert not issubclass(ConfigError, MeshRuntimeError)
    assert not issubclass(MeshRuntimeError, ConfigError)
