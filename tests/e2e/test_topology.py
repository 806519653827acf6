"""`mesh up` and `mesh demo` run what mesh.toml says, and refuse a wrong one before starting
anything: one line naming the file and the key, a hint, exit code 3, no traceback."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import Ran, live_registrations, mesh_env, run_mesh, start_mesh_up
from tests.support.waits import wait_for

pytestmark = pytest.mark.e2e

# A project's own agent package, next to its mesh.toml (here: the security reviewer re-used).
PROJECT_AGENT = """
from agents.security_review.agent import agent

agent.main()
"""
ONE_AGENT_TWICE = """
coordinators = 1

[[agents]]
module = "my_reviewer"
replicas = 2
"""


def _write(folder: Path, text: str, name: str = "mesh.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_mesh_up_runs_what_mesh_toml_lists(tmp_path: Path) -> None:
    """From another folder, through MESH_TOPOLOGY: the project's own package is found next to
    its mesh.toml, and runs as many times as the file says."""
    project = tmp_path / "project"
    (project / "my_reviewer").mkdir(parents=True)
    (project / "my_reviewer" / "__init__.py").write_text("")
    (project / "my_reviewer" / "__main__.py").write_text(PROJECT_AGENT)
    path = _write(project, ONE_AGENT_TWICE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    up = start_mesh_up(elsewhere, MESH_TOPOLOGY=str(path))
    try:
        assert f"3 processes from {path}" in up.stdout(), up.stdout()
        seen: list[Any] = []

        def two_instances() -> bool:
            regs = asyncio.run(live_registrations(up.url, up.home))
            seen[:] = sorted(f"{r.agent}/{r.instance}" for r in regs)
            return len(regs) == 2

        wait_for(
            two_instances,
            "two security-review instances",
            timeout=30,
            alive=up.assert_running,
            detail=lambda: seen,
        )
        assert {s.split("/")[0] for s in seen} == {"security-review"}, seen
        logs = sorted(p.name for p in (up.home / "logs").glob("*.log"))
        assert logs == [
            "coordinator.log",
            "my-reviewer-1.log",
            "my-reviewer-2.log",
            "schedule-relay.log",  # every `mesh up` runs one (mesh.schedules)
        ], logs
    finally:
        up.stop()


def _refused(ran: Ran, *says: str) -> list[str]:
    assert ran.returncode == 3, str(ran)
    assert "Traceback" not in ran.stdout + ran.stderr, str(ran)
    lines = ran.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: "), str(ran)
    assert lines[1].lstrip().startswith("→"), str(ran)  # what to do
    for text in says:
        assert text in lines[0], str(ran)
    return lines


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "[[agents]]\nmodule = 'agents.security_review'\nreplicas = 0\n",
            "[[agents]] #1 (agents.security_review): replicas",  # TOML shown as written
        ),
        ("[[agents]]\nmodule = 'agents.four_eyes'\n", "no module named 'agents.four_eyes'"),
        ("coordinators = 2\ncordinators = 1\n", "unknown key 'cordinators'"),
    ],
    ids=["replicas", "module", "key"],
)
def test_mesh_up_refuses_a_wrong_mesh_toml_before_starting_anything(
    tmp_path: Path, text: str, says: str
) -> None:
    path = _write(tmp_path, text)
    ran = run_mesh(["up"], cwd=tmp_path, env=mesh_env(tmp_path))
    _refused(ran, str(path), says)
    assert not (tmp_path / ".mesh").exists(), "something started"


def test_mesh_topology_and_the_option_name_the_file(tmp_path: Path) -> None:
    bad = _write(tmp_path, "replicas = -1\n", name="bad.toml")
    env = mesh_env(tmp_path, MESH_TOPOLOGY=str(bad))
    _refused(run_mesh(["up"], cwd=tmp_path, env=env), str(bad), "replicas")
    missing = tmp_path / "missing.toml"
    ran = run_mesh(["up", "--topology", str(missing)], cwd=tmp_path, env=mesh_env(tmp_path))
    _refused(ran, f"topology file {missing} not found")


def test_mesh_demo_needs_the_agent_it_pauses(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        [[agents]]
        module = "agents.security_review"
        demo = true
        """,
    )
    ran = run_mesh(["demo", "--topology", str(path)], cwd=tmp_path, env=mesh_env(tmp_path))
    _refused(ran, str(path), "quality-review")
    assert ran.stdout.strip() == "", str(ran)  # refused before its banner
