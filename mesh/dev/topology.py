"""The topology `mesh up` runs, read from `mesh.toml`: coordinators, agents and their replicas.

A project lists its agents in its `mesh.toml`, never in code: adding an agent to `mesh up` is
adding a `[[agents]]` table there. Every mistake in the file (a TOML error, an unknown key, a
count below 1, a module that cannot be found or has no `__main__.py`) is a `ConfigError` that
names the file and the key and says what to do, raised before anything starts.

Which file: `--topology PATH`, else `MESH_TOPOLOGY`, else `mesh.toml` in the working folder or
the nearest folder above it that has one, else the `mesh.toml` of the checkout this package runs
from (as `mesh.cards.cards_dir` falls back to the checkout's cards).
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import sys
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mesh.errors import ConfigError

FILE_NAME = "mesh.toml"
GUIDE = "docs/operations.md#the-topology-meshtoml"
_CHECKOUT = Path(__file__).resolve().parents[2]  # mesh/dev/topology.py -> the checkout
_MODULE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

Count = Annotated[int, Field(ge=1)]


class _Model(BaseModel):
    # strict: "2" is not 2 and 1 is not true; extra: a misspelt key is an error, not a default.
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class AgentTable(_Model):
    """One `[[agents]]` table."""

    module: str = Field(description="A package with a __main__.py, run as `python -m <module>`.")
    replicas: Count | None = Field(
        default=None, description="Instances of this agent (default: the file's `replicas`)."
    )
    demo: bool = Field(default=False, description="`mesh demo` starts it too (one instance).")

    @property
    def name(self) -> str:
        """The name of its processes and log files (`agents.security_review` → security-review)."""
        return self.module.rsplit(".", 1)[-1].replace("_", "-")


class ClusterTable(_Model):
    """The `[cluster]` table: what `mesh up --cluster N` runs instead of the top-level counts."""

    coordinators: Count = Field(default=2, description="Coordinator processes.")
    replicas: Count = Field(default=2, description="Instances of each agent.")


class MeshToml(_Model):
    """A whole `mesh.toml`."""

    coordinators: Count = Field(default=1, description="Coordinator processes.")
    replicas: Count = Field(
        default=1, description="Instances of each agent that sets no `replicas` of its own."
    )
    cluster: ClusterTable = Field(default_factory=ClusterTable)
    agents: list[AgentTable] = Field(default_factory=list)


@dataclass(frozen=True)
class AgentRun:
    name: str
    module: str
    replicas: int


@dataclass(frozen=True)
class Plan:
    """What to start: counts resolved from the file and the command line."""

    source: Path  # the mesh.toml it came from
    coordinators: int
    agents: tuple[AgentRun, ...]

    @property
    def root(self) -> Path:
        """The project folder (the file's); agent modules are found from there."""
        return self.source.parent

    @property
    def instances(self) -> int:
        return sum(a.replicas for a in self.agents)

    def processes(self) -> list[tuple[str, str]]:
        """(process name, module) in start order: coordinators first, then every agent."""
        found = [
            (f"coordinator-{i + 1}" if self.coordinators > 1 else "coordinator", "coordinator")
            for i in range(self.coordinators)
        ]
        for a in self.agents:
            found += [
                (f"{a.name}-{r + 1}" if a.replicas > 1 else a.name, a.module)
                for r in range(a.replicas)
            ]
        return found


@dataclass(frozen=True)
class TopologyConfig:
    """A validated `mesh.toml` and where it was read from."""

    source: Path
    spec: MeshToml

    def plan(
        self, *, cluster: bool = False, coordinators: int | None = None, replicas: int | None = None
    ) -> Plan:
        """What `mesh up` starts. The command line wins, then an agent's own `replicas`, then
        the file's counts (the `[cluster]` ones with `--cluster`)."""
        defaults = self.spec.cluster if cluster else self.spec
        agents = tuple(
            AgentRun(a.name, a.module, replicas or a.replicas or defaults.replicas)
            for a in self.spec.agents
        )
        return Plan(self.source, coordinators or defaults.coordinators, agents)

    def demo_plan(self) -> Plan:
        """What `mesh demo` starts: one coordinator and one instance of each `demo` agent."""
        agents = tuple(AgentRun(a.name, a.module, 1) for a in self.spec.agents if a.demo)
        return Plan(self.source, 1, agents)


# -- finding and loading ----------------------------------------------------------------------
def find(explicit: Path | None = None, *, start: Path | None = None) -> Path:
    """The topology file to use (see the module docstring for the order)."""
    if explicit is None:
        from mesh.settings import get_settings

        explicit = get_settings().topology
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(
                f"topology file {explicit} not found",
                hint=f"give the path of a mesh.toml (--topology or MESH_TOPOLOGY); see {GUIDE}",
            )
        return explicit
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / FILE_NAME).is_file():
            return folder / FILE_NAME
    if (_CHECKOUT / FILE_NAME).is_file():
        return _CHECKOUT / FILE_NAME
    raise ConfigError(
        f"no {FILE_NAME} in {here} or any folder above it",
        hint=f"create one that lists your agents, or pass --topology PATH; see {GUIDE}",
    )


def load(path: Path, *, check_modules: bool = True) -> TopologyConfig:
    """Read and validate a topology file; with `check_modules`, every agent module must be found
    (from the file's folder, the working folder or the installed packages) and runnable with
    `python -m`."""
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"topology file {path} not found", hint=f"see {GUIDE}") from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}", hint=f"see {GUIDE}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}", hint="fix the TOML syntax") from None
    return parse(raw, source=path, check_modules=check_modules)


def parse(raw: dict[str, Any], *, source: Path, check_modules: bool = True) -> TopologyConfig:
    try:
        spec = MeshToml.model_validate(raw)
    except ValidationError as e:
        raise _config_error(source, raw, e) from None
    seen: dict[str, int] = {}
    names: dict[str, AgentTable] = {}
    for i, agent in enumerate(spec.agents):
        key = f"{_agent_key(i, agent.module)}: module"
        if not _MODULE.match(agent.module):
            raise ConfigError(
                f"{source}: {key}: {agent.module!r} is not a module name",
                hint='give a dotted Python module path, e.g. module = "agents.security_review"',
            )
        if agent.module in seen:
            raise ConfigError(
                f"{source}: {key}: {agent.module} is listed twice (also [[agents]] "
                f"#{seen[agent.module] + 1})",
                hint="keep one table and set its replicas = N for more instances",
            )
        seen[agent.module] = i
        other = names.get(agent.name)
        if other is not None:
            raise ConfigError(
                f"{source}: {key}: {agent.module} and {other.module} would both run as "
                f"{agent.name!r} (the last part of the module names its processes and logs)",
                hint="rename one of the two packages",
            )
        names[agent.name] = agent
        if check_modules:
            _check_runnable(source, key, agent.module)
    return TopologyConfig(source, spec)


# -- one line per mistake -------------------------------------------------------------------------
_HINTS = {
    "module": 'a package with a __main__.py, e.g. module = "agents.security_review"',
    "replicas": "a whole number of instances, 1 or more",
    "coordinators": "a whole number of coordinator processes, 1 or more",
    "demo": "true or false",
    "agents": 'one [[agents]] table per agent, each with module = "package.name"',
    "cluster": "a [cluster] table with coordinators and replicas",
}


def _agent_key(index: int, module: object) -> str:
    named = f" ({module})" if isinstance(module, str) and module else ""
    return f"[[agents]] #{index + 1}{named}"


def _config_error(source: Path, raw: dict[str, Any], error: ValidationError) -> ConfigError:
    """The first problem pydantic found, as one line naming the key, and what to write."""
    # A misspelt key also leaves the real one missing: name the misspelling, it is the cause.
    problems = sorted(error.errors(), key=lambda p: p["type"] != "extra_forbidden")
    first = problems[0]
    loc = [str(p) for p in first["loc"]]
    if first["type"] == "extra_forbidden":
        parent, bad = loc[:-1], loc[-1]
        known = _known_keys(parent)
        where = _key_name(raw, parent)
        message = f"{source}: unknown key {bad!r}" + (f" in {where}" if where else "")
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        return ConfigError(message + more, hint=f"the keys are {', '.join(known)}")
    field = next((p for p in reversed(loc) if not p.isdigit()), "")
    got = f", got {first['input']!r}" if first["type"] != "missing" else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ConfigError(
        f"{source}: {_key_name(raw, loc)}: {first['msg'].lower()}{got}{more}",
        hint=_HINTS.get(field, f"see {GUIDE}"),
    )


def _key_name(raw: dict[str, Any], loc: list[str]) -> str:
    """`[[agents]] #2 (agents.x): replicas` for ('agents', '1', 'replicas'); `cluster.replicas`."""
    if len(loc) >= 2 and loc[0] == "agents" and loc[1].isdigit():
        index = int(loc[1])
        entries = raw.get("agents")
        entry = entries[index] if isinstance(entries, list) and index < len(entries) else None
        module = entry.get("module") if isinstance(entry, dict) else None
        head = _agent_key(index, module)
        return f"{head}: {'.'.join(loc[2:])}" if loc[2:] else head
    return ".".join(loc)


def _known_keys(parent: list[str]) -> list[str]:
    model: type[BaseModel] = MeshToml
    if parent[:1] == ["agents"]:
        model = AgentTable
    elif parent[:1] == ["cluster"]:
        model = ClusterTable
    return list(model.model_fields)


# -- can `python -m <module>` run it? -------------------------------------------------------------
def _check_runnable(source: Path, key: str, module: str) -> None:
    # Where an agent process looks: the working folder (`python -m` puts it first), the
    # project folder (the launcher adds it to PYTHONPATH), then this interpreter's path.
    search = [os.getcwd(), str(source.parent.resolve()), *sys.path]
    spec = find_module(module, search)
    if spec is None:
        raise ConfigError(
            f"{source}: {key}: no module named {module!r}",
            hint=f"fix the name, or create the package (docs/write-an-agent.md); modules are "
            f"found from {source.parent.resolve()} and the installed packages",
        )
    locations = spec.submodule_search_locations
    if (
        locations is not None
        and PathFinder.find_spec(f"{module}.__main__", list(locations)) is None
    ):
        raise ConfigError(
            f"{source}: {key}: {module} has no __main__.py, so `python -m {module}` cannot "
            "start it",
            hint=f"add {module.replace('.', '/')}/__main__.py that calls "
            "Agent.run_module(__package__) (docs/write-an-agent.md)",
        )


def agent_name(run: AgentRun, root: Path | None = None) -> str:
    """The name the agent of `run` gives itself (`agent = Agent("four-eyes", ...)` in its
    package's agent.py or __main__.py, or in the module they import `agent` from), read from
    the source without running it: the identity `mesh up` issues for its processes must name
    the subjects the agent serves. Falls back to the process name (`run.name`) when the source
    does not say it plainly."""
    return _agent_name(run.module, str((root or Path.cwd()).resolve())) or run.name


@lru_cache(maxsize=64)
def _agent_name(module: str, root: str, depth: int = 0) -> str | None:
    spec = find_module(module, [os.getcwd(), root, *sys.path])
    if spec is None or depth > 3:
        return None
    if spec.submodule_search_locations is not None:  # a package: its agent.py, its __main__.py
        sources = [Path(f) / n for f in spec.submodule_search_locations for n in _SOURCES]
    else:
        sources = [Path(spec.origin)] if spec.origin else []
    for source in sources:
        try:
            tree = ast.parse(source.read_text(), str(source))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in tree.body:
            if (
                isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "agent" for t in node.targets)
                and isinstance(node.value, ast.Call)
                and _called(node.value) == "Agent"
                and node.value.args
                and isinstance(node.value.args[0], ast.Constant)
                and isinstance(node.value.args[0].value, str)
            ):
                return node.value.args[0].value
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.level == 0
                and any(alias.name == "agent" and alias.asname is None for alias in node.names)
            ):
                found = _agent_name(node.module, root, depth + 1)
                if found:
                    return found
    return None


_SOURCES = ("agent.py", "__main__.py")


def _called(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    return func.attr if isinstance(func, ast.Attribute) else ""


def find_module(module: str, search: Sequence[str]) -> ModuleSpec | None:
    """The spec `import module` would find, without importing or running anything: each
    package along the dotted path is looked up in its parent's folders, not imported."""
    parts = module.split(".")
    spec = PathFinder.find_spec(parts[0], list(search))
    if spec is None:
        # Installed through a meta-path finder (an editable install) rather than a folder;
        # for a top-level name this looks it up without importing it.
        try:
            spec = importlib.util.find_spec(parts[0])
        except (ImportError, ValueError):
            return None
    for i in range(1, len(parts)):
        if spec is None or spec.submodule_search_locations is None:
            return None
        spec = PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec
