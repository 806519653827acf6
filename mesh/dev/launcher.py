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
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

from mesh import natsauth, subjects
from mesh._internal.lifecycle import spawn_tied
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


LOCK_FILE = "up.lock"
_GONE_TIMEOUT_S = 10.0  # how long an earlier owner's nats-server may take to stop


class HomeLock:
    """Exclusive use of a state folder (`.mesh`) by one `mesh up` (or `mesh demo`), held for
    the life of the process: an advisory `flock` on `<home>/up.lock`, released by the kernel
    however the process ends (kill -9 included), never inherited by a child (Python opens
    files non-inheritable). One nats-server per store, and `nats.json` written and removed by
    one owner only.

    The file also remembers, for the next owner, where the last one's NATS listened and which
    nats-server pids it ran: a restarted `mesh up` takes the same address again (so processes
    started by hand reconnect), and never starts a server on a store an old one still holds."""

    def __init__(self, home: Path, command: str) -> None:
        self.home = home
        self.command = command
        self.path = home / LOCK_FILE
        self.previous: dict[str, Any] = {}  # what the last owner recorded
        self._fd: int | None = None

    def acquire(self) -> Self:
        import fcntl

        self.home.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_json(fd)
            os.close(fd)
            who = f"`{holder.get('command', 'mesh up')}` (pid {holder.get('pid', '?')})"
            raise MeshRuntimeError(
                f"{self.home} is in use by {who}: stop it first (Ctrl-C where it runs), "
                f"or run this one from another folder or with another MESH_HOME"
            ) from None
        self._fd = fd
        self.previous = _read_json(fd)
        self.record()
        return self

    def record(self, *, url: str = "", nats_pids: list[int] | None = None) -> None:
        """Write who holds the folder (and, once known, where its NATS listens)."""
        if self._fd is None:
            return
        doc = {"pid": os.getpid(), "command": self.command, "url": url, "nats_pids": nats_pids}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(doc).encode(), 0)

    def previous_ports(self) -> list[int]:
        """The client ports the last owner's NATS servers listened on, in order (none known:
        empty)."""
        ports = []
        for url in str(self.previous.get("url") or "").split(","):
            try:
                ports.append(int(url.strip().rsplit(":", 1)[1]))
            except (IndexError, ValueError):
                return []
        return ports

    def wait_previous_servers(self, timeout: float = _GONE_TIMEOUT_S) -> None:
        """Until the nats-servers the last owner ran are gone (a killed `mesh up`'s server is
        told to stop by the kernel, and takes a moment); an error that names the pid if one
        still runs (an earlier owner on a system without parent-death signals)."""
        pids = [p for p in self.previous.get("nats_pids") or [] if isinstance(p, int)]
        deadline = time.monotonic() + timeout
        while True:
            left = [p for p in pids if _is_nats_server(p)]
            if not left:
                return
            if time.monotonic() > deadline:
                raise MeshRuntimeError(
                    f"nats-server pid {left[0]} of an earlier `mesh up` still runs on "
                    f"{self.home}: stop it (kill {left[0]}) and start again"
                )
            time.sleep(0.05)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the file stays: it is the lock, and the next owner reads it

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_json(fd: int) -> dict[str, Any]:
    try:
        doc = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _is_nats_server(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: alive is all we know
    name, _, rest = stat.partition("(")[2].rpartition(")")
    # A recycled pid is some other program's; a zombie holds no store.
    return name == "nats-server" and rest.split()[0] not in ("Z", "X")


# What a child with an identity of its own must not inherit from the launcher.
_NOT_INHERITED = ("MESH_IDENTITY", "MESH_TRUST", "MESH_NATS_CREDS")


# The agent identity the schedule relay of `mesh up` runs as.
SCHEDULER = "scheduler"


def issue_identities(ids: IdentityDir, plan: Plan) -> dict[str, Path]:
    """The identity file of every module a plan starts (`coordinator` included), issued on
    first use and reused after: call it before the NATS server starts, so the server admits
    them from the first moment."""
    found = {"coordinator": natsauth.ensure_identity(ids, "coordinator", "coordinator")}
    for run in plan.agents:
        found[run.module] = natsauth.ensure_identity(ids, "agent", agent_name(run, plan.root))
    found["mesh.schedules"] = natsauth.ensure_identity(ids, "agent", SCHEDULER)
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
        # Tied: if the launcher dies (even by SIGKILL), no coordinator or agent is left
        # running orphaned.
        proc = spawn_tied(
            [sys.executable, "-m", module],
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C goes to us; we stop children in order
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
        # One relay turns the server's schedule firings into signed events (mesh.schedules):
        # without it, firings wait in their stream. It signs as the `scheduler` agent.
        scheduler = self.identity("agent", SCHEDULER) if self.identities is not None else None
        self.spawn("schedule-relay", "mesh.schedules", identity=scheduler)

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
