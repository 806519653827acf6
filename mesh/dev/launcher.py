"""Starting and stopping the mesh as separate OS processes (demo, up, tests); what to start
comes from a topology plan (`mesh.dev.topology`).

Each process runs as its own identity: given an identity folder, `Topology` hands every child
only the path of its identity file and of the trust file (`MESH_IDENTITY`, `MESH_TRUST`; paths in
the environment, never secrets, never on the command line). The coordinators share the
coordinator's identity, the replicas of an agent share that agent's (they share its queue group
and its keys anyway); nothing the launcher's own environment holds (its operator identity, NATS
credentials) reaches a child that has one of its own."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mesh import natsauth, subjects
from mesh.bus import Bus
from mesh.dev.topology import Plan, agent_name
from mesh.errors import MeshRuntimeError
from mesh.identity import ALL_TENANTS, IdentityDir, Role
from mesh.registry import Registry

log = logging.getLogger(__name__)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes] | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


def _load_libc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc()
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: if the launcher dies (even by SIGKILL), the kernel sends us
    SIGTERM, so no coordinator or agent is left running orphaned (Linux; elsewhere a no-op)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


# What a child with an identity of its own must not inherit from the launcher.
_NOT_INHERITED = ("MESH_IDENTITY", "MESH_TRUST", "MESH_NATS_CREDS")


def issue_identities(ids: IdentityDir, plan: Plan) -> dict[str, Path]:
    """The identity file of every module a plan starts (`coordinator` included), issued on
    first use and reused after: call it before the NATS server starts, so the server admits
    them from the first moment."""
    found = {"coordinator": natsauth.ensure_identity(ids, "coordinator", "coordinator")}
    for run in plan.agents:
        found[run.module] = natsauth.ensure_identity(ids, "agent", agent_name(run, plan.root))
    return found


class Topology:
    """A coordinator and agent processes pointed at one NATS URL; stops what it started.

    `identities`: the folder to issue (or reuse) each process's identity from; without it the
    children inherit this process's environment (MESH_INSECURE=bus, or a test's choice).
    `on_new_identity`: called after an identity is issued while the server runs (say, its
    `reload`), so the server admits it before the process that uses it starts."""

    def __init__(
        self,
        nats_url: str,
        log_dir: Path,
        *,
        extra_env: dict[str, str] | None = None,
        identities: IdentityDir | None = None,
        on_new_identity: Callable[[], None] | None = None,
    ):
        self.nats_url = nats_url
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.identities = identities
        self.on_new_identity = on_new_identity
        self.children: list[Child] = []

    def identity(self, role: Role, name: str, *, tenant: str = ALL_TENANTS) -> Path:
        """The identity file of (role, name) in this topology's folder, issued on first use."""
        if self.identities is None:
            raise MeshRuntimeError("this topology has no identity folder to issue from")
        known = len(self.identities.users())
        path = natsauth.ensure_identity(self.identities, role, name, tenant=tenant)
        if len(self.identities.users()) != known and self.on_new_identity is not None:
            self.on_new_identity()
        return path

    def spawn(
        self,
        name: str,
        module: str,
        env: dict[str, str] | None = None,
        *,
        identity: Path | None = None,
    ) -> Child:
        """`python -m module` as process `name`; as `identity` (a file path) when given."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115  # closed in stop()
        inherited = dict(os.environ)
        own: dict[str, str] = {}
        if identity is not None:
            for key in _NOT_INHERITED:
                inherited.pop(key, None)
            own["MESH_IDENTITY"] = str(identity)
            if self.identities is not None:
                own["MESH_TRUST"] = str(self.identities.trust_path)
        full_env = {
            **inherited,
            "MESH_NATS_URL": self.nats_url,
            "MESH_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **(env or {}),
            **own,
        }
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to us; we stop children in order
            # Safe despite PLW1509: the hook makes one syscall through a libc handle loaded
            # before the fork, so the child takes no lock another thread might hold.
            preexec_fn=_die_with_parent,  # noqa: PLW1509
        )
        child = Child(name, proc, log_path, out)
        self.children.append(child)
        return child

    def start(self, plan: Plan) -> None:
        """Start what a topology plan lists: its coordinators, then every agent instance, each
        as its role's identity when this topology has an identity folder."""
        # Agent modules are found from the project folder (mesh.toml's) as well, wherever
        # `mesh up` runs from: the check in `mesh.dev.topology` looks there too.
        inherited = self.extra_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        path = os.pathsep.join(p for p in (str(plan.root.resolve()), inherited) if p)
        who: dict[str, Path] = {}
        if self.identities is not None:
            who["coordinator"] = self.identity("coordinator", "coordinator")
            for run in plan.agents:
                who[run.module] = self.identity("agent", agent_name(run, plan.root))
        for name, module in plan.processes():
            self.spawn(name, module, {"PYTHONPATH": path}, identity=who.get(module))

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    async def wait_ready(self, bus: Bus, agents: int, timeout: float = 30.0) -> None:
        """Until `agents` instances are registered and a coordinator is pulling events."""
        registry = Registry(bus)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            dead = [c for c in self.children if not c.alive]
            if dead:
                c = dead[0]
                tail = c.log_path.read_text(errors="replace")[-1500:]
                raise MeshRuntimeError(f"{c.name} exited with code {c.proc.returncode}:\n{tail}")
            live = await registry.live()
            pulling = False
            with contextlib.suppress(Exception):
                info = await bus.js.consumer_info(
                    subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE
                )
                pulling = (info.num_waiting or 0) > 0
            if len(live) >= agents and pulling:
                return
            await asyncio.sleep(0.1)
        raise MeshRuntimeError(
            f"the mesh did not come up within {timeout:.0f}s; logs are in {self.log_dir}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        for c in self.children:
            if c.alive:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGCONT)  # a paused child cannot handle TERM
                    c.proc.terminate()
        deadline = time.monotonic() + timeout
        for c in self.children:
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                c.proc.kill()
                c.proc.wait()
            if c._log:
                c._log.close()
        self.children.clear()
