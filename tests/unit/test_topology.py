"""mesh.toml, the topology `mesh up` runs: the shipped file reproduces the mesh as it always was,
command-line counts win over the file, every mistake is one line naming the file and the key,
and nothing under mesh/ lists agent modules."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

from mesh.dev import topology
from mesh.dev.topology import Plan, TopologyConfig
from mesh.errors import ConfigError
from mesh.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "mesh.toml"
REVIEWERS = ["agents.security_review", "agents.compliance_review", "agents.quality_review"]


def _modules(plan: Plan) -> list[tuple[str, int]]:
    return [(a.module, a.replicas) for a in plan.agents]


@pytest.fixture
def shipped() -> TopologyConfig:
    return topology.load(SHIPPED)


# -- the shipped mesh.toml ------------------------------------------------------------------------
def test_shipped_file_runs_three_reviewers_and_triage_with_one_coordinator(
    shipped: TopologyConfig,
) -> None:
    plan = shipped.plan()
    assert plan.coordinators == 1
    assert _modules(plan) == [(m, 1) for m in [*REVIEWERS, "agents.triage"]]
    assert plan.instances == 4
    assert plan.processes() == [
        ("coordinator", "coordinator"),
        ("security-review", "agents.security_review"),
        ("compliance-review", "agents.compliance_review"),
        ("quality-review", "agents.quality_review"),
        ("triage", "agents.triage"),
    ]
    assert plan.source == SHIPPED and plan.root == ROOT


def test_shipped_file_with_cluster_runs_two_coordinators_and_two_of_each(
    shipped: TopologyConfig,
) -> None:
    plan = shipped.plan(cluster=True)
    assert plan.coordinators == 2
    assert _modules(plan) == [(m, 2) for m in [*REVIEWERS, "agents.triage"]]
    names = [name for name, _ in plan.processes()]
    assert names[:4] == ["coordinator-1", "coordinator-2", "security-review-1", "security-review-2"]
    assert names[-1] == "triage-2"


def test_shipped_file_gives_the_demo_its_three_reviewers(shipped: TopologyConfig) -> None:
    plan = shipped.demo_plan()
    assert (plan.coordinators, _modules(plan)) == (1, [(m, 1) for m in REVIEWERS])


def test_command_line_counts_win(shipped: TopologyConfig) -> None:
    plan = shipped.plan(coordinators=3, replicas=2)
    assert plan.coordinators == 3 and {r for _, r in _modules(plan)} == {2}
    plan = shipped.plan(cluster=True, coordinators=1, replicas=1)
    assert plan.coordinators == 1 and {r for _, r in _modules(plan)} == {1}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mesh.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_an_agents_own_replicas_win_over_the_files(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
        replicas = 2
        [cluster]
        replicas = 4
        [[agents]]
        module = "agents.security_review"
        replicas = 3
        [[agents]]
        module = "agents.triage"
        """,
    )
    config = topology.load(path)
    assert _modules(config.plan()) == [("agents.security_review", 3), ("agents.triage", 2)]
    assert _modules(config.plan(cluster=True)) == [
        ("agents.security_review", 3),
        ("agents.triage", 4),
    ]
    assert _modules(config.plan(replicas=1)) == [
        ("agents.security_review", 1),
        ("agents.triage", 1),
    ]
    assert config.plan(cluster=True).coordinators == 2  # [cluster] default


def test_empty_file_means_one_coordinator_and_no_agents(tmp_path: Path) -> None:
    plan = topology.load(_write(tmp_path, "")).plan()
    assert (plan.coordinators, plan.agents) == (1, ())


# -- finding the file -----------------------------------------------------------------------------
def test_found_in_the_working_folder_or_above(tmp_path: Path) -> None:
    path = _write(tmp_path, "")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    assert topology.find(start=deep) == path
    assert topology.find(start=tmp_path) == path


def test_explicit_path_wins_and_must_exist(tmp_path: Path) -> None:
    _write(tmp_path, "")
    other = tmp_path / "other.toml"
    other.write_text("")
    assert topology.find(other, start=tmp_path) == other
    with pytest.raises(ConfigError, match=r"topology file .*nope\.toml not found") as e:
        topology.find(tmp_path / "nope.toml", start=tmp_path)
    assert "--topology" in e.value.hint


def test_mesh_topology_setting_is_the_default_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "elsewhere.toml"
    other.write_text("")
    monkeypatch.setenv("MESH_TOPOLOGY", str(other))
    assert Settings().topology == other
    get_settings.cache_clear()  # find() reads the process-wide settings
    try:
        assert topology.find(start=tmp_path) == other
    finally:
        get_settings.cache_clear()


def test_without_any_file_the_checkouts_own_is_used(tmp_path: Path) -> None:
    # tmp_path has no mesh.toml above it; this checkout has one (as cards/ falls back to its own).
    if any((p / "mesh.toml").exists() for p in (tmp_path, *tmp_path.parents)):
        pytest.skip(f"a mesh.toml above {tmp_path} on this machine")
    assert topology.find(start=tmp_path) == SHIPPED


# -- every mistake: one line naming the file and the key, and what to do --------------------------
MISTAKES = [
    ("coordinators = 0", "coordinators", "1 or more"),
    ('coordinators = "2"', "coordinators", "1 or more"),
    ("replicas = 1.5", "replicas", "1 or more"),
    ("[cluster]\nreplicas = 0", "cluster.replicas", "1 or more"),
    ("[cluster]\nreplica = 2", "unknown key 'replica' in cluster", "coordinators, replicas"),
    ("agent = []", "unknown key 'agent'", "agents"),
    ('[agents]\nmodule = "agents.triage"', "agents", "[[agents]]"),
    ("[[agents]]\nreplicas = 2", "[[agents]] #1: module", "module ="),
    ('[[agents]]\nmodul = "agents.triage"', "unknown key 'modul' in [[agents]] #1", "module"),
    (
        '[[agents]]\nmodule = "agents.triage"\nreplicas = 0',
        "[[agents]] #1 (agents.triage): replicas",
        "1 or more",
    ),
    (
        '[[agents]]\nmodule = "agents.triage"\ndemo = "yes"',
        "[[agents]] #1 (agents.triage): demo",
        "true or false",
    ),
    ('[[agents]]\nmodule = "agents/triage"', "is not a module name", "dotted"),
    (
        '[[agents]]\nmodule = "agents.no_such_agent"',
        "[[agents]] #1 (agents.no_such_agent): module: no module named",
        "write-an-agent",
    ),
    ('[[agents]]\nmodule = "agents"', "agents has no __main__.py", "agents/__main__.py"),
    (
        '[[agents]]\nmodule = "agents.triage"\n[[agents]]\nmodule = "agents.triage"',
        "[[agents]] #2 (agents.triage): module: agents.triage is listed twice",
        "replicas",
    ),
    ("coordinators = ", "mesh.toml", "TOML syntax"),
]


@pytest.mark.parametrize(("text", "says", "hint"), MISTAKES, ids=[m[1] for m in MISTAKES])
def test_every_mistake_is_one_line_naming_file_and_key(
    tmp_path: Path, text: str, says: str, hint: str
) -> None:
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfigError) as e:
        topology.load(path)
    message = e.value.message
    assert "\n" not in message, message
    assert message.startswith(f"{path}: ") or str(path) in message, message
    assert says in message, message
    assert hint in e.value.hint, e.value.hint


def test_two_modules_with_the_same_process_name(tmp_path: Path) -> None:
    pkg = tmp_path / "other" / "triage"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("")
    (tmp_path / "other" / "__init__.py").write_text("")
    path = _write(
        tmp_path,
        """
        [[agents]]
        module = "agents.triage"
        [[agents]]
        module = "other.triage"
        """,
    )
    with pytest.raises(ConfigError, match=r"would both run as 'triage'") as e:
        topology.load(path)
    assert "rename" in e.value.hint


def test_modules_are_found_from_the_files_folder(tmp_path: Path) -> None:
    """A project's own package, next to its mesh.toml, is found without installing it; a plain
    module (`python -m` runs it as it is) needs no __main__.py."""
    pkg = tmp_path / "my_agent"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('not imported by the check')\n")
    (pkg / "__main__.py").write_text("")
    (tmp_path / "solo.py").write_text("")
    path = _write(
        tmp_path,
        """
        [[agents]]
        module = "my_agent"
        [[agents]]
        module = "solo"
        """,
    )
    plan = topology.load(path).plan()
    assert [(a.name, a.module) for a in plan.agents] == [("my-agent", "my_agent"), ("solo", "solo")]
    (pkg / "__main__.py").unlink()
    with pytest.raises(ConfigError, match=r"my_agent has no __main__\.py"):
        topology.load(path)


# -- nothing under mesh/ lists agents ------------------------------------------------------------
def test_no_agent_module_is_named_in_mesh_code() -> None:
    """The agents `mesh up` and `mesh demo` run come from mesh.toml only: no string in mesh/ is
    an agent module's name (examples inside messages are fine)."""
    module_name = re.compile(r"agents\.\w+")
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.value}"
        for path in sorted((ROOT / "mesh").rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and module_name.fullmatch(node.value)
    ]
    assert not offenders, offenders


def test_the_check_would_see_the_old_constants() -> None:
    source = 'REVIEWERS = ("agents.security_review", "agents.quality_review")\n'
    values = [n.value for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Constant)]
    assert [v for v in values if re.fullmatch(r"agents\.\w+", v)] == values
