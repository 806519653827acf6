"""The docs of mesh.toml hold to the code: operations.md shows the shipped file as it is and lists
every key with its default, and the shipped file is valid."""

from __future__ import annotations

import tomllib

from mesh.dev import topology
from tests.docs.blocks import DOCS, REPO, blocks, table_rows

SECTION = "## The topology: mesh.toml"


def _shown(default: object) -> str:
    if default is None:
        return "the file's"  # an agent's replicas: the file's count
    if isinstance(default, bool):
        return str(default).lower()
    return str(default)


def topology_keys() -> dict[str, str]:
    """Every mesh.toml key as operations.md names it, with its default as the page shows it."""
    keys: dict[str, str] = {}
    for prefix, model in (
        ("", topology.MeshToml),
        ("cluster.", topology.ClusterTable),
        ("agents[].", topology.AgentTable),
    ):
        for name, field in model.model_fields.items():
            if name in ("cluster", "agents"):  # the tables themselves
                continue
            keys[prefix + name] = "required" if field.is_required() else _shown(field.default)
    return keys


def test_the_shipped_mesh_toml_is_valid() -> None:
    config = topology.load(REPO / topology.FILE_NAME)
    assert config.spec.agents, "mesh.toml lists no agents"


def test_operations_lists_every_topology_key_with_its_default() -> None:
    section = (DOCS / "operations.md").read_text().split(SECTION, 1)[1].split("\n## ", 1)[0]
    rows = table_rows(section)
    keys = topology_keys()
    assert set(rows) == set(keys), f"operations.md: keys {sorted(rows)}, code {sorted(keys)}"
    for key, default in keys.items():
        assert rows[key][0] == default, f"`{key}`: page {rows[key][0]!r}, code {default!r}"
        assert rows[key][1].strip(), f"`{key}`: say what it does"


def test_operations_shows_the_shipped_mesh_toml() -> None:
    [block] = [
        b for b in blocks(DOCS / "operations.md") if b.lang == "toml" and "[[agents]]" in b.code
    ]
    shipped = tomllib.loads((REPO / topology.FILE_NAME).read_text())
    assert tomllib.loads(block.code) == shipped, f"{block.id}: not what mesh.toml says"
