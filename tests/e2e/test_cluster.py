"""`mesh up --cluster 3` as a real process: three nats-servers in one JetStream cluster, streams
replicated on all three, two coordinators and two replicas of every agent; a release decided
through it; Ctrl-C stops every process it started."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.procs import (
    MeshUp,
    bus_settings,
    live_registrations,
    mesh_env,
    refused,
    run_mesh,
    start_mesh_up,
    still_running,
    stranger_seed,
)
from tests.support.samples import sample

pytestmark = pytest.mark.e2e

REVIEWERS = {"security-review", "compliance-review", "quality-review"}
NODES = 3
DECIDE_TIMEOUT_S = 20.0  # the release policy's deadline is 4 s; this only bounds a broken run


def _six_reviewers(regs: list[Any]) -> bool:
    return len([r for r in regs if r.agent in REVIEWERS]) == 2 * len(REVIEWERS)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshUp]:
    # No MESH_NATS_URL; MESH_HOME in its folder; heartbeat 0.5 s, card TTL 3 s (`mesh_env`).
    mesh = start_mesh_up(tmp_path_factory.mktemp("cluster"), "--cluster", str(NODES))
    try:
        assert "MESH_NATS_URL" not in mesh.env
        asyncio.run(mesh.wait_agents(_six_reviewers, "6 reviewer instances registered"))
        mesh.remember_children()
        yield mesh
    finally:
        mesh.stop()


def test_state_file_lists_every_server(up: MeshUp) -> None:
    urls = up.url.split(",")
    assert len(urls) == NODES and len(set(urls)) == NODES, up.url
    assert all(u.startswith("nats://127.0.0.1:") for u in urls), urls
    for i in range(1, NODES + 1):
        assert (up.home / "cluster" / f"n{i}" / "jetstream").is_dir(), i
    assert "NATS cluster of 3" in up.stdout(), up.stdout()


async def test_streams_and_buckets_are_replicated_on_three_servers(up: MeshUp) -> None:
    from mesh import subjects
    from mesh.bus import STREAMS, Bus

    names = [s.name for s in STREAMS] + [
        f"KV_{subjects.CARDS_BUCKET}",
        f"KV_{subjects.DECISIONS_BUCKET}",
    ]
    async with await Bus.connect(up.url, name="e2e-test", settings=bus_settings(up.home)) as bus:
        for name in names:
            info = await bus.js.stream_info(name)
            assert info.config.num_replicas == NODES, (name, info.config)
            assert info.cluster is not None and info.cluster.leader, (name, info.cluster)
            peers = {info.cluster.leader} | {p.name for p in info.cluster.replicas or []}
            assert peers == {"n1", "n2", "n3"}, (name, info.cluster)


async def test_a_release_is_decided_through_the_cluster(up: MeshUp) -> None:
    from mesh import envelope, subjects
    from mesh.bus import Bus
    from mesh.records import Decision, decision_decoder

    event = envelope.new_event(
        "release.proposed", sample("secret"), event_id=f"e2e-{uuid.uuid4().hex[:8]}"
    )
    async with await Bus.connect(up.url, name="e2e-test", settings=bus_settings(up.home)) as bus:
        got: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

        async def on_decision(msg: Any) -> None:
            d = decision_decoder.decode(msg.data)
            if d.event_id == event.id and not got.done():
                got.set_result(d)

        sub = await bus.nc.subscribe(f"{subjects.DECISIONS_ROOT}.>", cb=on_decision)
        await bus.nc.flush()
        ack = await bus.publish_event(event)
        assert ack.stream == subjects.EVENTS_STREAM
        try:
            decision = await asyncio.wait_for(got, DECIDE_TIMEOUT_S)
        except TimeoutError:
            raise AssertionError(f"no decision for {event.id}\n{up.logs()}") from None
        finally:
            await sub.unsubscribe()
    assert decision.outcome == "rejected", decision
    assert {v.agent for v in decision.votes} == REVIEWERS
    [security] = [v for v in decision.votes if v.agent == "security-review"]
    assert security.verdict is not None and security.verdict.vote == "reject", security
    assert decision.coordinator.startswith("coordinator-"), decision.coordinator


async def test_every_node_refuses_anonymous_and_unknown_clients(
    up: MeshUp, tmp_path_factory: pytest.TempPathFactory
) -> None:
    stranger = stranger_seed(tmp_path_factory.mktemp("stranger"))
    for url in up.url.split(","):
        assert "authorization" in await refused(url), url
        assert "authorization" in await refused(url, stranger), url


def test_other_commands_find_the_cluster_through_the_state_file(up: MeshUp) -> None:
    """`mesh agents` in the same folder, without MESH_NATS_URL: it reads .mesh/nats.json."""
    listed = up.mesh("agents")
    assert listed.returncode == 0, str(listed)
    # 3 reviewers and the triage agent, 2 replicas each.
    assert "8 live agent instance(s)" in listed.stdout, str(listed)
    # Two coordinators: each answers when it is serving (one may still be starting its loop
    # on a loaded machine when the agents are all up), so ask again, a bounded number of times.
    for _ in range(10):
        status = up.mesh("status", "--wait", "1")
        if status.stdout.count("event(s) in flight") == 2:
            break
    assert status.returncode == 0, str(status)
    assert status.stdout.count("event(s) in flight") == 2, str(status)


def test_ctrl_c_stops_every_process(up: MeshUp) -> None:
    """Last in the module: it stops the shared `mesh up`."""
    regs = asyncio.run(live_registrations(up.url, up.home))
    agent_pids = {r.pid for r in regs}
    assert len(agent_pids) == 8, regs
    children = up.remember_children()
    assert agent_pids <= set(children), (agent_pids, children)
    # The three nats-servers, 2 coordinators and 8 agents: all started by `mesh up`.
    assert len(children) >= NODES + 2 + 8, children
    log_files = sorted(p.name for p in (up.home / "logs").glob("*.log"))
    assert len(log_files) == 2 + 8 + 1, log_files  # and the schedule relay's

    up.stop()  # SIGINT to its group; raises if anything it started is still running after
    assert up.proc.returncode == 0, up.logs()
    assert still_running(up.known) == [], up.known
    assert not (up.home / "nats.json").exists()  # state cleared: no stale URL for the CLI


def test_cluster_refuses_what_cannot_work(tmp_path: Path) -> None:
    two = run_mesh(["up", "--cluster", "2"], cwd=tmp_path, env=mesh_env(tmp_path))
    assert two.returncode == 2, str(two)
    assert "--cluster" in two.stderr and "Traceback" not in two.stderr, str(two)

    env = mesh_env(tmp_path, MESH_NATS_URL="nats://127.0.0.1:1")
    both = run_mesh(["up", "--cluster", "3"], cwd=tmp_path, env=env)
    assert both.returncode == 3, str(both)
    assert "MESH_NATS_URL is set" in both.stderr and "Traceback" not in both.stderr, str(both)
    assert not (tmp_path / ".mesh" / "cluster").exists()  # nothing was started


async def test_local_cluster_keeps_accepting_writes_when_a_server_dies(tmp_path: Path) -> None:
    """`LocalCluster` directly: own stores, fsync on every write, R3 survives losing a node."""
    from mesh import envelope, subjects
    from mesh.bus import Bus
    from mesh.server import CONFIG_FILE, LocalCluster
    from mesh.settings import Settings

    async with LocalCluster(NODES, tmp_path / "cluster") as cluster:
        procs = [s.proc for s in cluster.servers]
        assert cluster.url == ",".join(cluster.urls) and len(set(cluster.urls)) == NODES
        for i, server in enumerate(cluster.servers, start=1):
            assert server.store_dir == tmp_path / "cluster" / f"n{i}"
            conf = server.config_path.read_text()
            assert "sync_interval: always" in conf, conf
            # The route password is in the config (mode 0600), never on the command line.
            assert oct(server.config_path.stat().st_mode)[-3:] == "600"
            assert "password" in conf and cluster.route_auth[1] in conf
            assert server.proc is not None
            assert cluster.route_auth[1] not in " ".join(map(str, server.proc.args))
            log = (server.store_dir / "nats-server.log").read_text()
            assert CONFIG_FILE in log, log[-2000:]  # the fsync setting was loaded
            assert cluster.route_auth[1] not in log

        settings = Settings(stream_replicas=NODES)
        async with await Bus.connect(cluster.url, name="e2e-test", settings=settings) as bus:
            await bus.ensure()
            first = await bus.publish_event(envelope.new_event("release.proposed", {"id": "r1"}))
            info = await bus.js.stream_info(subjects.EVENTS_STREAM)
            assert info.cluster is not None
            connected = bus.nc.connected_url
            assert connected is not None
            # Stop a follower we are not connected to: no election, no reconnect, only quorum.
            [victim, *_] = [
                s
                for s in cluster.servers
                if s.name != info.cluster.leader and not s.url.endswith(f":{connected.port}")
            ]
            assert victim.proc is not None
            victim.proc.kill()
            victim.proc.wait(10)
            second = await bus.publish_event(envelope.new_event("release.proposed", {"id": "r2"}))
            assert second.seq == first.seq + 1 and not second.duplicate
            info = await bus.js.stream_info(subjects.EVENTS_STREAM)
            assert info.state.messages == 2
    assert all(p is not None and p.poll() is not None for p in procs)  # every server stopped
    assert (tmp_path / "cluster" / "n1" / "jetstream").is_dir()  # a given folder is kept
