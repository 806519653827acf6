"""`mesh new agent NAME`: what it writes passes its own test (run by pytest as a user would,
in the folder it scaffolded), lint and format, names a card and module `mesh up` accepts, and
it never overwrites."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.cards import load_card
from mesh.dev import topology as topo
from tests.e2e.procs import mesh_env, run_mesh

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
WRITTEN = [
    "cards/my-checker.json",
    "agents/my_checker/__init__.py",
    "agents/my_checker/agent.py",
    "agents/my_checker/__main__.py",
    "tests/__init__.py",
    "tests/test_my_checker.py",
    "mesh.toml",
]


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def test_new_agent_passes_its_own_tests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The repository's layout (its agents, cards, mesh.toml and pytest/ruff settings), copied:
    # a project with agents already, and no tests/ folder yet.
    project = tmp_path / "project"
    project.mkdir()
    for name in ("mesh.toml", "pyproject.toml"):
        shutil.copy(REPO / name, project / name)
    for name in ("agents", "cards"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    before = (project / "mesh.toml").read_text()
    env = mesh_env(project)
    made = run_mesh(["new", "agent", "my-checker"], cwd=project, env=env)
    assert made.returncode == 0, str(made)
    for name in WRITTEN:
        assert f"wrote {name}" in made.stdout, str(made)
        assert (project / name).is_file(), name

    card = load_card(project / "cards" / "my-checker.json")  # valid A2A 1.0, or it raises
    assert card.name == "my-checker" and [s.id for s in card.skills] == ["my-checker-check"]
    toml = (project / "mesh.toml").read_text()
    assert toml.startswith(before) and 'module = "agents.my_checker"' in toml[len(before) :]
    monkeypatch.chdir(project)  # where `mesh up` would run (its agents package, not ours)
    plan = topo.load(project / "mesh.toml").plan()  # what `mesh up` reads
    assert [a.module for a in plan.agents][-1] == "agents.my_checker"

    # The repository's own lint and format rules (what `make test` checks first).
    generated = [str(project / n) for n in WRITTEN if n.endswith(".py")]
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check", *generated], ["format", "--check", *generated]):
        linted = subprocess.run(
            [str(ruff), *args], cwd=project, capture_output=True, text=True, timeout=60, check=False
        )
        assert linted.returncode == 0, linted.stdout + linted.stderr

    # `make test` type-checks agents/ strictly (the repository's mypy settings, copied above).
    # mypy cannot follow the import hook of an editable install (`pip install -e`, what
    # `make` does): it is shown the `mesh` package itself, as a user's installed wheel would be.
    stubs = tmp_path / "installed"
    stubs.mkdir()
    (stubs / "mesh").symlink_to(REPO / "mesh", target_is_directory=True)
    typed = subprocess.run(
        [sys.executable, "-m", "mypy", "agents/my_checker"],
        cwd=project,
        env={**env, "MYPYPATH": str(stubs)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert typed.returncode == 0, typed.stdout + typed.stderr

    # Its tests, as generated, with pytest in the scaffolded folder: a real nats-server.
    env.pop("PYTHONPATH", None)
    ran = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stdout[-4000:] + ran.stderr[-2000:]
    assert "3 passed" in ran.stdout, ran.stdout[-2000:]


def test_new_agent_never_overwrites(tmp_path: Path) -> None:
    env = mesh_env(tmp_path)
    assert run_mesh(["new", "agent", "dup"], cwd=tmp_path, env=env).returncode == 0
    (tmp_path / "agents" / "dup" / "agent.py").write_text("# mine\n")
    before = _files(tmp_path)
    again = run_mesh(["new", "agent", "dup"], cwd=tmp_path, env=env)
    assert again.returncode == 3 and "exists already" in again.stderr, str(again)
    assert "Traceback" not in again.stderr, str(again)
    assert _files(tmp_path) == before  # nothing written, nothing changed

    # Only mesh.toml lists it: still nothing written.
    other = tmp_path / "other"
    other.mkdir()
    (other / "mesh.toml").write_text('[[agents]]\nmodule = "agents.dup"\n')
    listed = run_mesh(["new", "agent", "dup"], cwd=other, env=env)
    assert listed.returncode == 3 and "agents.dup" in listed.stderr, str(listed)
    assert sorted(p.name for p in other.iterdir()) == ["mesh.toml"]

    # A mesh.toml `mesh up` refuses already: said, and nothing written.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "mesh.toml").write_text('[[agents]]\nmodule = "agents.missing"\n')
    refused = run_mesh(["new", "agent", "fine"], cwd=broken, env=env)
    assert refused.returncode == 3 and "agents.missing" in refused.stderr, str(refused)
    assert _files(broken) == {"mesh.toml": '[[agents]]\nmodule = "agents.missing"\n'}

    bad = run_mesh(["new", "agent", "Not_A_Name"], cwd=tmp_path, env=env)
    assert bad.returncode == 3 and "is not an agent name" in bad.stderr, str(bad)
    card = json.loads((tmp_path / "cards" / "dup.json").read_text())
    assert card["name"] == "dup"
