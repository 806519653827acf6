"""`mesh new agent NAME`: a new agent in the current folder, ready to run and tested.

It writes what docs/write-an-agent.md walks through, and nothing else: the card
(`cards/NAME.json`), the package (`agents/NAME_SNAKE/`: `__init__.py`, `agent.py` with one
typed `@agent.rules` handler, `__main__.py`), a test on a real nats-server
(`tests/test_NAME_SNAKE.py`, `mesh.testing`) and a `[[agents]]` table in `mesh.toml`, so `mesh
up` starts it. It never overwrites: if any of those files exists, or mesh.toml already lists
the module, it writes nothing and says which. The templates are in `mesh/cli/templates/agent/`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer

from mesh.cli._common import out, user_errors
from mesh.errors import ConfigError

app = typer.Typer(
    help="Scaffold something new in this folder (never overwrites).", no_args_is_help=True
)

TEMPLATES = Path(__file__).with_name("templates") / "agent"
# A card name that is also a Python package name once '-' becomes '_' (and a NATS token).
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
MAX_NAME = 28  # so every generated line fits in 100 columns, as ruff format keeps them


def _imports(root: Path, *, stdlib: str, agent_import: str) -> tuple[str, str]:
    """The import blocks of agent.py and of the test, sorted as ruff sorts them in `root`:
    `mesh` is first-party where it is a folder of the project (this repository), else a
    third-party package beside msgspec and pytest."""
    if (root / "mesh").is_dir():
        return (
            f"{stdlib}\n\nfrom mesh import Agent, Verdict",
            f"import pytest\n\n{agent_import}\nfrom mesh.testing import MeshHarness, verdict_of",
        )
    return (
        f"{stdlib}\nfrom mesh import Agent, Verdict",
        f"import pytest\nfrom mesh.testing import MeshHarness, verdict_of\n\n{agent_import}",
    )


def _render(template: str, values: dict[str, str]) -> str:
    text = (TEMPLATES / template).read_text(encoding="utf-8")
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    if "{{" in text:  # a placeholder without a value: a bug here, not the user's
        raise AssertionError(f"unfilled placeholder in {template}")
    return text


def card(name: str, skill: str, description: str) -> dict[str, Any]:
    """A valid A2A 1.0 card (no supportedInterfaces: each instance fills in where it listens)."""
    return {
        "name": name,
        "description": description,
        "version": "0.1.0",
        "capabilities": {"streaming": True, "pushNotifications": False},
        "defaultInputModes": ["application/json"],
        "defaultOutputModes": ["application/json"],
        "skills": [
            {
                "id": skill,
                "name": f"{name} check",
                "description": "Votes approve when the request has text, reject otherwise "
                "(a placeholder: say what the agent checks).",
                "tags": [name],
                "examples": ['{"id": "req-1", "text": "hello"}'],
                "inputModes": ["application/json"],
                "outputModes": ["application/json"],
            }
        ],
    }


def _topology_entry(module: str) -> str:
    return f'\n[[agents]]\nmodule = "{module}"  # made by `mesh new agent`; started by `mesh up`\n'


def scaffold(root: Path, name: str) -> list[Path]:
    """Write a new agent under `root`; the files written (mesh.toml last). Raises ConfigError,
    having written nothing, when NAME is not usable, something is already there, or the
    mesh.toml it would leave is one `mesh up` refuses."""
    from mesh.dev import topology as topo

    if not _NAME.match(name) or len(name) > MAX_NAME:
        raise ConfigError(
            f"{name!r} is not an agent name for `mesh new agent`",
            hint=f"lower-case letters and digits in words joined by '-', at most {MAX_NAME} "
            "characters, e.g. four-eyes",
        )
    snake = name.replace("-", "_")
    module = f"agents.{snake}"
    skill = f"{name}-check"
    description = f"{name} (made by `mesh new agent`): says what it checks here."
    agent_imports, test_imports = _imports(
        root,
        stdlib="import msgspec",
        agent_import=f"from {module}.agent import Request, agent, check",
    )
    values = {
        "imports": agent_imports,
        "name": name,
        "module": module,
        "skill": skill,
        "event_type": f"{snake}.requested",
        "description": description,
    }
    test_values = {**values, "imports": test_imports}
    package = root / "agents" / snake
    files: dict[Path, str] = {
        root / "cards" / f"{name}.json": json.dumps(card(name, skill, description), indent=2)
        + "\n",
        package / "__init__.py": _render("__init__.py.tmpl", values),
        package / "agent.py": _render("agent.py.tmpl", values),
        package / "__main__.py": _render("__main__.py.tmpl", values),
        root / "tests" / f"test_{snake}.py": _render("test_agent.py.tmpl", test_values),
    }
    # Folders a fresh project lacks become packages, so `agents.NAME` and the test import.
    for folder in (root / "agents", root / "tests"):
        if not folder.exists():
            files[folder / "__init__.py"] = ""
    topology = root / "mesh.toml"
    taken = [p for p in files if p.exists()]
    if package.exists():
        taken.append(package)
    if (root / "agents" / f"{snake}.py").exists():
        taken.append(root / "agents" / f"{snake}.py")
    listed = topology.exists() and re.search(
        rf'^\s*module\s*=\s*"{re.escape(module)}"', topology.read_text(), re.MULTILINE
    )
    if taken or listed:
        what = ", ".join(str(_shown(p, root)) for p in taken) or f"mesh.toml's {module}"
        raise ConfigError(
            f"{name} exists already here ({what}); nothing written",
            hint="pick another name, or remove what is there",
        )
    before = topology.read_text() if topology.exists() else None
    if before is not None:
        topo.load(topology)  # a mesh.toml that is wrong already: say so, write nothing
    written: list[Path] = []
    made = [d for d in {p.parent for p in files} if not d.exists()]  # (all under root)
    try:
        for path, text in files.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            written.append(path)
        if before is not None:
            sep = "" if before.endswith("\n") else "\n"
            topology.write_text(before + sep + _topology_entry(module))
        else:
            topology.write_text(
                '# What `mesh up` runs (docs/operations.md: "The topology: mesh.toml").\n'
                + _topology_entry(module)
            )
        topo.load(topology)  # what `mesh up` will read, checked now (the new module included)
    except BaseException:
        # All or nothing: what `mesh up` would refuse is not left half-made.
        for path in reversed(written):
            path.unlink(missing_ok=True)
        for folder in sorted(made, key=lambda p: -len(p.parts)):
            if folder.exists() and not any(folder.iterdir()):
                folder.rmdir()
        if before is None:
            topology.unlink(missing_ok=True)
        else:
            topology.write_text(before)
        raise
    return [*written, topology]


def _shown(path: Path, root: Path) -> Path:
    try:
        return path.relative_to(root)
    except ValueError:
        return path


@app.command("agent")
def new_agent(
    name: Annotated[str, typer.Argument(help="The agent's name (its card's), e.g. four-eyes.")],
) -> None:
    """A new agent here: its card, package (agent.py, __main__.py), a test on a real
    nats-server and a mesh.toml entry. Writes nothing if any of it exists."""
    root = Path.cwd()
    with user_errors():
        written = scaffold(root, name)
    for path in written:
        out.print(f"wrote {_shown(path, root)}", highlight=False, soft_wrap=True)
    snake = name.replace("-", "_")
    out.print(
        f"next: pytest tests/test_{snake}.py · mesh run agents.{snake} · put skill "
        f"{name}-check in a policy (docs/write-an-agent.md)",
        highlight=False,
        soft_wrap=True,
    )
