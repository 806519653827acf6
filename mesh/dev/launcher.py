"""Starting and stopping the mesh as separate OS processes (demo, up, tests); what to start
comes from a topology plan (`mesh.dev.topology`)."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mesh import subjects
from mesh.bus import Bus
from mesh.dev.topology import Plan
from mesh.errors import MeshRuntimeError
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


class Topology:
    """A coordinator and agent processes pointed at one NATS URL; stops what it started."""

    def __init__(self, nats_url: str, log_dir: Path, *, extra_env: dict[str, str] | None = None):
        self.nats_url = nats_url
        self.log_dir = log_dir
        self.extra_env = extra_env or {}
        self.children: list[Child] = []

    def spawn(self, name: str, module: str, env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        out = open(log_path, "ab")  # noqa: SIM115  # closed in stop()
        full_env = {
            **os.environ,
            "MESH_NATS_URL": self.nats_url,
            "MESH_LOG_FORMAT": "json",
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            **(env or {}),
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
        """Start what a topology plan lists: its coordinators, then every agent instance."""
        # Agent modules are found from the project folder (mesh.toml's) as well, wherever
        # `mesh up` runs from: the check in `mesh.dev.topology` looks there too.
        inherited = self.extra_env.get("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
        path = os.pathsep.join(p for p in (str(plan.root.resolve()), inherited) if p)
        for name, module in plan.processes():
            self.spawn(name, module, {"PYTHONPATH": path})

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
