"""One mesh per store, with real processes: a second `mesh up` in a folder refuses, a killed
`mesh up` leaves nothing running, a restarted one keeps its NATS address, and an agent started
by hand (`mesh run`) reconnects to it and stops on Ctrl-C without a traceback.

Every wait is bounded; only processes these tests started (and their descendants, remembered
with their start times) are ever signalled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.e2e.procs import (
    MESH,
    MeshUp,
    descendants,
    kill_remembered,
    live_registrations,
    start_mesh_up,
    still_running,
)
from tests.support.waits import wait_for

pytestmark = pytest.mark.e2e

GONE_TIMEOUT_S = 20.0  # bounds a broken run only: the kernel signals at once


def _small_mesh(folder: Path) -> Path:
    """A mesh.toml of one agent (security-review): the least this machine has to start."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mesh.toml").write_text('[[agents]]\nmodule = "agents.security_review"\n')
    return folder


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _state(up: MeshUp) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((up.home / "nats.json").read_text())
    return doc


@pytest.fixture
def cleanup() -> Iterator[list[MeshUp]]:
    """`mesh up`s to stop at the end, whatever the test did to them."""
    ups: list[MeshUp] = []
    yield ups
    for up in ups:
        with contextlib.suppress(AssertionError):
            up.stop()


def test_a_second_mesh_up_in_the_folder_refuses(tmp_path: Path, cleanup: list[MeshUp]) -> None:
    first = start_mesh_up(_small_mesh(tmp_path))
    cleanup.append(first)
    before = _state(first)

    second = first.mesh("up", timeout=60)

    assert second.returncode == 1, str(second)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, str(second)
    assert "in use by `mesh up`" in lines[0] and f"pid {first.proc.pid}" in lines[0], lines
    assert "stop it first" in lines[0], lines
    assert "Traceback" not in second.stdout + second.stderr, str(second)
    # The first one is untouched: still running, its state file still its own.
    first.assert_running()
    assert _state(first) == before
    assert before["pid"] == first.proc.pid
    listed = first.mesh("agents")
    assert listed.returncode == 0 and "security-review" in listed.stdout, str(listed)


def test_kill_9_of_mesh_up_leaves_nothing_and_a_restart_keeps_the_address(
    tmp_path: Path, cleanup: list[MeshUp]
) -> None:
    folder = _small_mesh(tmp_path)
    first = start_mesh_up(folder)
    cleanup.append(first)
    spawned = first.remember_children()
    servers = [pid for pid in spawned if _comm(pid) == "nats-server"]
    assert len(servers) == 1, {pid: _comm(pid) for pid in spawned}
    assert len(spawned) >= 3, spawned  # nats-server, the coordinator, the agent
    url = first.url

    os.kill(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)

    wait_for(
        lambda: not still_running(spawned),
        "every process the killed `mesh up` started gone",
        timeout=GONE_TIMEOUT_S,
        detail=lambda: {pid: _comm(pid) for pid in still_running(spawned)},
    )

    # Its lock went with it: a new `mesh up` in the folder starts, on the same address.
    second = start_mesh_up(folder)
    cleanup.append(second)
    assert second.url == url, (second.url, url)
    assert _state(second)["pid"] == second.proc.pid


class _HandAgent:
    """`mesh run MODULE` started by hand in a `mesh up`'s folder, as its own agent identity."""

    def __init__(self, up: MeshUp, module: str, identity: Path) -> None:
        self.out_path = up.cwd / "agent.out"
        self._out: IO[bytes] = open(self.out_path, "wb")  # noqa: SIM115  # closed in stop()
        self.proc = subprocess.Popen(
            [str(MESH), "run", module],
            cwd=up.cwd,
            env={**up.env, "MESH_IDENTITY": str(identity)},
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.known: dict[int, str] = {}

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    def assert_running(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"`mesh run` exited {self.proc.returncode}:\n{self.output()}")

    def stop(self) -> None:
        self.known.update(descendants(self.proc.pid))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        kill_remembered(self.known)
        self._out.close()


def _instance_of(pid: int, after: float) -> Any:
    """A check: the registration of process `pid` heartbeating since `after` (epoch s)."""

    def check(regs: list[Any]) -> bool:
        return any(r.pid == pid and r.seen_at > after for r in regs)

    return check


async def _wait_registered(up: MeshUp, agent: _HandAgent, after: float, what: str) -> None:
    regs: list[Any] = []

    async def look() -> bool:
        agent.assert_running()
        regs[:] = await live_registrations(up.url, up.home)
        return bool(_instance_of(agent.proc.pid, after)(regs))

    deadline = time.monotonic() + 30
    while not await look():
        if time.monotonic() > deadline:
            seen = [(r.agent, r.pid, r.seen_at) for r in regs]
            raise AssertionError(f"{what}: not within 30s; live: {seen}\n{agent.output()}")
        await asyncio.sleep(0.2)


def test_an_agent_started_by_hand_reconnects_to_a_restarted_mesh_up(
    tmp_path: Path, cleanup: list[MeshUp]
) -> None:
    folder = _small_mesh(tmp_path)
    first = start_mesh_up(folder)
    cleanup.append(first)
    issued = first.mesh("creds", "agent", "quality-review")
    assert issued.returncode == 0, str(issued)
    identity = first.home / "identity" / "agent-quality-review.json"
    assert identity.exists(), str(issued)
    agent = _HandAgent(first, "agents.quality_review", identity)
    try:
        asyncio.run(_wait_registered(first, agent, 0.0, "the hand-started agent registered"))

        first.stop()  # Ctrl-C: a clean stop; the agent keeps dialling the same address
        agent.assert_running()
        restarted_at = time.time()
        second = start_mesh_up(folder)
        cleanup.append(second)
        assert second.url == first.url, (second.url, first.url)
        asyncio.run(
            _wait_registered(second, agent, restarted_at, "the agent back after the restart")
        )
        assert "reconnected to" in agent.output(), agent.output()

        # Ctrl-C on the agent while NATS is gone: it stops, with no traceback.
        second.stop()
        agent.assert_running()
        os.kill(agent.proc.pid, signal.SIGINT)
        try:
            agent.proc.wait(GONE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`mesh run` ignored Ctrl-C:\n{agent.output()}") from None
        assert agent.proc.returncode == 0, agent.output()
        assert "Traceback" not in agent.output(), agent.output()
    finally:
        agent.stop()


_SPAWNS_FROM_A_THREAD = """
import sys, threading
from mesh._internal.lifecycle import spawn_tied

found = []
worker = threading.Thread(target=lambda: found.append(spawn_tied(["sleep", "120"])))
worker.start()
worker.join()  # the thread that asked for the child is gone; the child must not be
print(found[0].pid, flush=True)
sys.stdin.read()  # until the test kills us
"""


def test_a_tied_child_outlives_the_thread_that_started_it_not_the_process() -> None:
    """PR_SET_PDEATHSIG fires when the forking *thread* ends: `spawn_tied` forks from a thread
    that lives as long as the process, so a child started from a worker thread (as
    `LocalCluster` starts its servers) keeps running until the process dies, kill -9 included."""
    parent = subprocess.Popen(
        [sys.executable, "-c", _SPAWNS_FROM_A_THREAD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    known: dict[int, str] = {}
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "the helper printed no pid within 30s"
        child = int(parent.stdout.readline())
        known.update(descendants(parent.pid))
        assert child in known, (child, known)
        wait_for(lambda: bool(still_running({child: known[child]})), "child runs", timeout=5)

        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_for(
            lambda: not still_running(known),
            "the tied child gone with its parent",
            timeout=GONE_TIMEOUT_S,
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
        parent.wait(10)
        kill_remembered(known)


def test_sigterm_stops_mesh_up_cleanly_without_a_traceback(
    tmp_path: Path, cleanup: list[MeshUp]
) -> None:
    up = start_mesh_up(_small_mesh(tmp_path))
    cleanup.append(up)
    spawned = up.remember_children()

    up.proc.send_signal(signal.SIGTERM)  # the process alone, as a service manager would
    try:
        up.proc.wait(GONE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"`mesh up` ignored SIGTERM\n{up.logs()}") from None

    assert up.proc.returncode == 0, up.logs()
    assert "Traceback" not in up.stdout() + up.stderr(), up.logs()
    assert "stopping…" in up.stderr(), up.logs()
    wait_for(lambda: not still_running(spawned), "its children stopped", timeout=GONE_TIMEOUT_S)
    assert not (up.home / "nats.json").exists()  # its own state file, removed by its owner


def _mesh_process(
    args: list[str], cwd: Path, env: dict[str, str], out_path: Path
) -> subprocess.Popen[bytes]:
    """`mesh ARGS` in its own session, its output (both streams) in `out_path`."""
    with open(out_path, "wb") as out:
        return subprocess.Popen(
            [str(MESH), *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def test_ctrl_c_while_mesh_demo_runs_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    from tests.e2e.procs import mesh_env

    out_path = tmp_path / "demo.out"
    demo = _mesh_process(["demo"], tmp_path, mesh_env(tmp_path), out_path)
    known: dict[int, str] = {}
    try:

        def started() -> bool:
            if demo.poll() is not None:
                raise AssertionError(f"`mesh demo` exited: {out_path.read_text()}")
            known.update(descendants(demo.pid))
            return any(_comm(pid) == "nats-server" for pid in known) and len(known) >= 3

        wait_for(started, "`mesh demo` started its processes", timeout=60)
        os.kill(demo.pid, signal.SIGINT)
        try:
            demo.wait(GONE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`mesh demo` ignored Ctrl-C: {out_path.read_text()}") from None
        said = out_path.read_text(errors="replace")
        assert demo.returncode == 130, said
        assert "Traceback" not in said, said
        after = said.split("stopping…", 1)
        assert len(after) == 2 and not after[1].strip(), said  # nothing after the one line
        wait_for(lambda: not still_running(known), "its processes stopped", timeout=GONE_TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(demo.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            demo.wait(10)
        kill_remembered(known)


def test_a_restarted_cluster_keeps_its_addresses(tmp_path: Path, cleanup: list[MeshUp]) -> None:
    folder = _small_mesh(tmp_path)
    first = start_mesh_up(folder, "--cluster", "3", "--coordinators", "1", "--replicas", "1")
    cleanup.append(first)
    first.stop()
    second = start_mesh_up(folder, "--cluster", "3", "--coordinators", "1", "--replicas", "1")
    cleanup.append(second)
    assert second.url == first.url and second.url.count(",") == 2, (second.url, first.url)


def test_ctrl_c_while_mesh_up_starts_leaves_nothing(tmp_path: Path) -> None:
    from tests.e2e.procs import mesh_env

    folder = _small_mesh(tmp_path)
    out_path = folder / "up.out"
    up = _mesh_process(["up"], folder, mesh_env(folder), out_path)
    known: dict[int, str] = {}
    try:

        def starting() -> bool:
            if up.poll() is not None:
                raise AssertionError(f"`mesh up` exited: {out_path.read_text()}")
            known.update(descendants(up.pid))
            return any(_comm(pid) == "nats-server" for pid in known)

        wait_for(starting, "`mesh up` started nats-server", timeout=60, every=0.02)
        os.kill(up.pid, signal.SIGINT)
        try:
            up.wait(GONE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"`mesh up` ignored Ctrl-C: {out_path.read_text()}") from None
        said = out_path.read_text(errors="replace")
        assert "Traceback" not in said, said
        # Interrupted while starting: 130; if it made it up first, a clean stop.
        assert up.returncode == (0 if "mesh is up" in said else 130), said
        known.update(descendants(up.pid))
        wait_for(lambda: not still_running(known), "its processes stopped", timeout=GONE_TIMEOUT_S)
        assert not (folder / ".mesh" / "nats.json").exists(), said
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(up.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            up.wait(10)
        kill_remembered(known)
