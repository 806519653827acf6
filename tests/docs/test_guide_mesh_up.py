"""docs/write-an-agent.md followed literally, with `mesh up`: in a copy of the checkout (its
agents/, coordinator/, cards/ and mesh.toml; `mesh` itself is this repository's, untouched),
save every file the guide shows where it says, add its `mesh.toml` table and its policy, run
`mesh up` as a process, run the guide's `mesh publish` line, and find the new agent's vote in
the decision. Every wait is bounded; every process is killed by pid at the end."""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docs.blocks import REPO, Block, commands, page_blocks
from tests.e2e.procs import MeshUp, start_mesh_up

pytestmark = pytest.mark.e2e

GUIDE = "write-an-agent.md"
DECIDE_TIMEOUT_S = 20.0  # the guide's policy has a 4 s deadline; this only bounds a broken run
# What a checkout has that the guide's steps touch or need (the `mesh` package is not copied:
# the guide changes nothing under mesh/, so this repository's runs).
CHECKOUT = ("agents", "coordinator", "cards", "mesh.toml")


def guide_files() -> list[Block]:
    """The blocks the guide has the reader save as files (`<!-- file: ... as PATH -->`)."""
    return [b for b in page_blocks(GUIDE) if b.save_as is not None]


def guide_table() -> set[str]:
    """The files the guide's "You will write" table lists."""
    text = (REPO / "docs" / GUIDE).read_text()
    table = text.split("You will write:", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `([^`]+)` \|", table, re.MULTILINE))


def guide_toml(marker: str) -> Block:
    [block] = [b for b in page_blocks(GUIDE, "toml") if marker in b.code]
    return block


def _split(text: str) -> tuple[list[str], list[str]]:
    """TOML text as (top-level keys and comments, then the tables from the first header on)."""
    lines = text.rstrip().splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith("[")), len(lines))
    return lines[:first], lines[first:]


def with_tables_replaced(original: str, excerpt: str) -> str:
    """`original` TOML with every top-level key and table that `excerpt` sets replaced by the
    excerpt's (what the guide shows is the file's new version of those parts)."""
    replaced = set(tomllib.loads(excerpt))
    head, tables = _split(original)
    new_head, new_tables = _split(excerpt)
    head = [
        line
        for line in head
        if not ((m := re.match(r"^([A-Za-z_][\w-]*)\s*=", line)) and m[1] in replaced)
    ]
    kept: list[str] = []
    dropping = False
    for line in tables:
        header = re.match(r'^\[\s*"?([^"\]]+)"?\s*\]', line)
        if header:
            dropping = header[1] in replaced
        if not dropping:
            kept.append(line)
    text = "\n".join([*head, "", *new_head, "", *kept, "", *new_tables]) + "\n"
    # The surgery is right only if the result is exactly the original with the excerpt's parts.
    assert tomllib.loads(text) == {**tomllib.loads(original), **tomllib.loads(excerpt)}
    return text


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the checkout with the guide's steps done, as the reader would have it."""
    root = tmp_path / "checkout"
    root.mkdir()
    for name in CHECKOUT:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, root / name)

    # The files the guide shows, saved where it says: exactly the new files its table lists.
    saved = guide_files()
    paths = [b.save_as for b in saved if b.save_as]
    assert len(paths) == len(set(paths)), paths
    new_files = {p for p in guide_table() if p.startswith(("agents/", "cards/"))}
    assert set(paths) == new_files, (sorted(paths), sorted(new_files))
    for block in saved:
        assert block.save_as is not None
        target = root / block.save_as
        assert not target.exists(), f"{block.save_as} would overwrite a file of the checkout"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.code)

    # "add a table for the agent at the end of mesh.toml"
    entry = guide_toml("[[agents]]")
    topology = root / "mesh.toml"
    before = tomllib.loads(topology.read_text())
    topology.write_text(topology.read_text().rstrip() + "\n\n" + entry.code)
    after = tomllib.loads(topology.read_text())
    assert after["agents"] == [*before["agents"], *tomllib.loads(entry.code)["agents"]]

    # "Add its skill to the policy of release.proposed in coordinator/policies.toml"
    policies = root / "coordinator" / "policies.toml"
    policy = guide_toml("release-four-eyes-review")
    policies.write_text(with_tables_replaced(policies.read_text(), policy.code))
    return root


@pytest.fixture
def up(project: Path) -> Iterator[MeshUp]:
    # The checkout's packages first (its agents/ now has four_eyes), then this repository's.
    path = os.pathsep.join([str(project), str(REPO)])
    mesh = start_mesh_up(project, PYTHONPATH=path)
    try:
        yield mesh
    finally:
        mesh.stop()


def test_the_guides_agent_votes_in_mesh_up(up: MeshUp) -> None:
    # `mesh is up` means every instance mesh.toml lists registered: four-eyes among them.
    assert "6 processes from mesh.toml" in up.stdout(), up.logs()
    assert (up.home / "logs" / "four-eyes.log").is_file(), up.logs()

    [publish] = [
        c
        for b in page_blocks(GUIDE, "sh")
        for c in commands(b)
        if c[:3] == ["mesh", "publish", "release.proposed"]
    ]
    ran = up.mesh(*publish[1:])
    assert ran.returncode == 0, str(ran)
    event_id = ran.stdout.strip()

    decision = up.wait_decision(event_id, timeout=DECIDE_TIMEOUT_S)
    assert [v["agent"] for v in decision["votes"]] == [
        "security-review",
        "compliance-review",
        "quality-review",
        "four-eyes",
    ], decision
    four = decision["votes"][-1]
    assert four["outcome"] == "voted" and four["brain"] == "rules", four
    assert four["verdict"]["vote"] == "approve", four
    assert four["verdict"]["reasons"] == ["approved by bob.nguyen, not the author"], four
    assert decision["outcome"] == "approved", decision


def test_the_table_surgery_replaces_only_what_the_excerpt_sets() -> None:
    original = 'ignore = ["a"]\n\n["x"]\nk = 1\n\n["y"]\nk = 2\n'
    text = with_tables_replaced(original, 'ignore = ["a", "b"]\n\n["x"]\nk = 3\n')
    assert tomllib.loads(text) == {"ignore": ["a", "b"], "x": {"k": 3}, "y": {"k": 2}}
