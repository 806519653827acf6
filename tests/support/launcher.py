"""Meshes of OS processes for tests and benchmarks, built on the product's own launcher
(`mesh.dev.launcher.Topology`): coordinators and agents pointed at a NATS URL, what tests do to
them (kill -9, SIGSTOP/SIGCONT, stop one by pid), their logs on failure; and `Cluster`, a local
3-node NATS cluster whose nodes can be killed, paused and restarted.

Everything started here is stopped by pid in `stop()` (a paused process is resumed first: a
stopped process cannot handle SIGTERM). Every wait is bounded (`waits.eventually`).

Each coordinator, reviewer and voter runs as its own identity (issued from the run's identity
folder, as `mesh up` issues them; the server reloads when one is new); a process started with
`spawn` alone inherits this process's identity (the operator's) unless given one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

from mesh import natsauth
from mesh.bus import Bus
from mesh.dev.launcher import Child, Topology
from mesh.identity import IdentityDir
from mesh.registry import Registry
from mesh.server import EmbeddedServer, LocalCluster
from mesh.settings import Settings
from tests.support.samples import REPO, REVIEWERS, write_card, write_policy
from tests.support.waits import all_alive, eventually

# Short liveness clocks for tests that wait on the registry; nothing is a timing assertion.
HEARTBEAT_S = 0.5
CARD_TTL_S = 3.0
VOTER_MODULE = "tests.support.voter"
START_TIMEOUT_S = 60.0  # start-up of a whole mesh on a loaded 2-core box


@dataclass
class Running:
    """The processes `ProcessMesh.up` started: coordinators, and agent replicas by agent name."""

    coordinators: list[Child] = field(default_factory=list)
    agents: dict[str, list[Child]] = field(default_factory=dict)

    def all(self) -> list[Child]:
        return [*self.coordinators, *(c for cs in self.agents.values() for c in cs)]

    def alive(self) -> None:
        """Raises if any of these processes has exited: pass `running.alive` as a wait's
        `alive` check. It looks at the processes listed when it runs, so a replacement put in
        a killed process's place (or a process removed from the lists) counts from then on."""
        all_alive(*self.all())()


def clocks(heartbeat_s: float = HEARTBEAT_S, card_ttl_s: float = CARD_TTL_S) -> dict[str, str]:
    """The registry's clocks for `ProcessMesh(env=...)` (the short test ones by default)."""
    return {"MESH_HEARTBEAT_S": str(heartbeat_s), "MESH_CARD_TTL_S": str(card_ttl_s)}


class ProcessMesh:
    """A `Topology` of coordinator and agent processes plus what tests do to them."""

    def __init__(
        self,
        nats_url: str,
        work: Path,
        env: dict[str, str] | None = None,
        *,
        server: EmbeddedServer | LocalCluster | Cluster | None = None,
        identities: IdentityDir | None = None,
    ) -> None:
        """`env`: settings every child gets (e.g. `clocks()`); the product's defaults else.
        `server`: reloaded when a child needs an identity the server does not know yet.
        `identities`: where the children's identities come from (default: the folder in
        effect, the run's)."""
        self.work = work
        self.log_dir = work / "logs"
        self.cards = work / "cards"
        base = {
            "MESH_HOME": str(work / ".mesh"),
            "MESH_ALLOW_MODEL_REQUESTS": "0",
            "ANTHROPIC_API_KEY": "",  # the rules answer, never a model
            # Children run test and bench modules too (the voter): the repo must import.
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        self.identities = identities or natsauth.resolve_identity_dir(Settings())
        self.topology = Topology(
            nats_url,
            self.log_dir,
            extra_env={**base, **(env or {})},
            identities=self.identities,
            on_new_identity=server.reload if server is not None else None,
        )
        self.paused: dict[int, Child] = {}
        self._ids = itertools.count(1)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- starting ---------------------------------------------------------------------------------
    def spawn(
        self,
        name: str,
        module: str,
        env: dict[str, str] | None = None,
        *,
        identity: Path | None = None,
    ) -> Child:
        """`python -m module` as its own process, its output in `logs/<name>.log`; as
        `identity` when given (else as this process: the operator)."""
        return self.topology.spawn(name, module, env, identity=identity)

    def identity(self, role: Any, name: str, **kwargs: Any) -> Path | None:
        """The identity file of (role, name), issued (and the server reloaded) on first use;
        None when there is no identity folder (MESH_INSECURE=bus)."""
        if self.identities is None:
            return None
        return self.topology.identity(role, name, **kwargs)

    def policy(self, policies: dict[str, dict[str, Any]], **kwargs: Any) -> Path:
        """Write a policy file for the coordinators (see `samples.write_policy`)."""
        self.work.mkdir(parents=True, exist_ok=True)
        return write_policy(self.work / f"policies-{next(self._ids)}.toml", policies, **kwargs)

    def coordinator(self, policy: Path | None = None, name: str | None = None) -> Child:
        name = name or f"coordinator-{next(self._ids)}"
        env = {"MESH_POLICY_FILE": str(policy)} if policy else {}
        return self.spawn(
            name, "coordinator", env, identity=self.identity("coordinator", "coordinator")
        )

    def reviewer(self, agent: str, tag: str = "") -> Child:
        """One replica of a shipped reviewer (`security-review`, ...)."""
        return self.spawn(
            f"{agent}-{tag or next(self._ids)}",
            REVIEWERS[agent],
            identity=self.identity("agent", agent),
        )

    def voter(self, name: str, skill: str, env: dict[str, str] | None = None) -> Child:
        """The test voting agent (`tests.support.voter`) named `name`, with one skill."""
        write_card(self.cards, name, skill)
        return self.spawn(
            f"{name}-{next(self._ids)}",
            VOTER_MODULE,
            {"MESH_CARDS_DIR": str(self.cards), "VOTER_NAME": name, **(env or {})},
            identity=self.identity("agent", name),
        )

    async def up(
        self,
        bus: Bus,
        policy: Path | None = None,
        *,
        coordinators: int = 1,
        replicas: int = 1,
        reviewers: Iterable[str] = REVIEWERS,
        voters: dict[str, str] | None = None,
        also: Iterable[str] = (),
        timeout: float = START_TIMEOUT_S,
    ) -> Running:
        """Start `replicas` of each reviewer and of each voter (name → skill), then the
        coordinators; return once every one of those processes is registered (and the agents
        named in `also`, started elsewhere) and every coordinator consumes."""
        running = Running()
        for agent in reviewers:
            running.agents[agent] = [self.reviewer(agent, str(r + 1)) for r in range(replicas)]
        for name, skill in (voters or {}).items():
            running.agents[name] = [self.voter(name, skill) for _ in range(replicas)]
        running.coordinators = [self.coordinator(policy) for _ in range(coordinators)]
        pids = {c.proc.pid for cs in running.agents.values() for c in cs}
        await self.wait_agents(
            bus, [*running.agents, *also], pids=pids, timeout=timeout, alive=running.alive
        )
        for c in running.coordinators:
            await self.wait_consuming(c, timeout=timeout)
        return running

    # -- waiting ----------------------------------------------------------------------------------
    async def wait_agents(
        self,
        bus: Bus,
        names: Iterable[str],
        *,
        pids: Iterable[int] = (),
        timeout: float = START_TIMEOUT_S,
        alive: Callable[[], None] | None = None,
    ) -> None:
        """Until every agent in `names` has a live registration, and every process in `pids`
        has registered itself."""
        wanted, wanted_pids = set(names), set(pids)
        registry = Registry(bus)
        missing: list[str] = []

        async def registered() -> bool:
            live = await registry.live()
            missing[:] = sorted(wanted - {r.agent for r in live})
            missing.extend(f"pid {p}" for p in sorted(wanted_pids - {r.pid for r in live}))
            return not missing

        await eventually(
            registered,
            f"agents {sorted(wanted)} registered",
            timeout=timeout,
            every=0.1,
            alive=alive,
            detail=lambda: f"missing {missing}",
        )

    async def wait_consuming(self, coordinator: Child, timeout: float = START_TIMEOUT_S) -> None:
        """Until this coordinator process has bound the durable (it logs `... consuming ...`)."""
        await eventually(
            lambda: " consuming " in self.log(coordinator),
            f"{coordinator.name} consuming",
            timeout=timeout,
            every=0.1,
            alive=all_alive(coordinator),
            detail=lambda: self.log(coordinator)[-1500:],
        )

    # -- faults -----------------------------------------------------------------------------------
    def kill9(self, child: Child) -> None:
        with contextlib.suppress(ProcessLookupError):
            child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)

    def pause(self, child: Child) -> None:
        self.paused[child.proc.pid] = child
        child.proc.send_signal(signal.SIGSTOP)

    def resume(self, child: Child) -> None:
        if self.paused.pop(child.proc.pid, None) is not None and child.alive:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGCONT)

    def stop_child(self, child: Child, timeout: float = 10.0) -> None:
        """SIGTERM this one process (SIGCONT first), SIGKILL if it lingers."""
        self.paused.pop(child.proc.pid, None)
        if child.alive:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGCONT)
                child.proc.terminate()
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait(5)

    def stop(self) -> None:
        for child in list(self.paused.values()):
            self.resume(child)
        self.topology.stop()

    # -- logs -------------------------------------------------------------------------------------
    def log(self, child: Child) -> str:
        try:
            return child.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def logs_tail(self, chars: int = 800) -> str:
        """The end of every process's log, for a failure message."""
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"--- {path.name} ---\n{text[-chars:]}")
        return "\n".join(parts)

    def error_summary(self, top: int = 5) -> str:
        """The most frequent logged errors of every process (JSON logs: level and exception)."""
        counts: Counter[str] = Counter()
        for path in self.log_dir.glob("*.log"):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    doc = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(doc, dict) or doc.get("level") not in ("error", "critical"):
                    continue
                exc = str(doc.get("exc") or "").strip().splitlines()
                counts[f"{doc.get('msg', '')[:80]} | {exc[-1] if exc else ''}"] += 1
        return "\n".join(f"  {n}x {what}" for what, n in counts.most_common(top))


class Cluster:
    """`LocalCluster(n)` plus what chaos does to its nodes. A node killed with SIGKILL comes back
    with the same name, store folder, client port, cluster port and routes."""

    def __init__(self, base_dir: Path, n: int = 3) -> None:
        self.cluster = LocalCluster(n, base_dir)
        self.paused: set[str] = set()
        self._client_ports: dict[str, int] = {}

    def reload(self) -> None:
        """Every running node admits the identity folder's users as they are now."""
        for s in self.servers:
            if s.proc is not None and s.proc.poll() is None:
                s.reload()

    def start(self) -> Self:
        self.cluster.start()
        for s in self.cluster.servers:
            assert s.name is not None
            self._client_ports[s.name] = int(urlsplit(s.url).port or 0)
        return self

    @property
    def url(self) -> str:
        return self.cluster.url

    @property
    def servers(self) -> list[EmbeddedServer]:
        return self.cluster.servers

    @property
    def names(self) -> list[str]:
        return [s.name or "" for s in self.servers]

    def server(self, name: str) -> EmbeddedServer:
        for s in self.servers:
            if s.name == name:
                return s
        raise KeyError(f"no node {name!r} (nodes: {self.names})")

    def running(self, name: str) -> bool:
        s = self.server(name)
        return s.proc is not None and s.proc.poll() is None

    def kill9(self, name: str) -> None:
        s = self.server(name)
        assert s.proc is not None and self.running(name), f"{name} is not running"
        s.proc.send_signal(signal.SIGKILL)
        s.proc.wait(10)

    async def restart(self, name: str, attempts: int = 5) -> None:
        """Start a killed node again on its own ports (the port may linger a moment)."""
        s = self.server(name)
        s.port = self._client_ports[name]
        for attempt in range(1, attempts + 1):
            try:
                await asyncio.to_thread(s.start)
                return
            except Exception:
                if attempt == attempts:
                    raise
                await asyncio.sleep(1.0)

    def pause(self, name: str) -> None:
        s = self.server(name)
        assert s.proc is not None and self.running(name), f"{name} is not running"
        self.paused.add(name)
        s.proc.send_signal(signal.SIGSTOP)

    def resume(self, name: str) -> None:
        s = self.server(name)
        self.paused.discard(name)
        if s.proc is not None and self.running(name):
            with contextlib.suppress(ProcessLookupError):
                s.proc.send_signal(signal.SIGCONT)

    def resume_all(self) -> None:
        for name in list(self.paused):
            self.resume(name)

    def stop(self) -> None:
        self.resume_all()  # a stopped process cannot handle SIGTERM
        self.cluster.stop()
