"""A client whose NATS server freezes (SIGSTOP: no socket closes, nothing answers) notices it
by missed PONGs and reconnects to another node of the cluster within seconds (mesh.bus
PING_INTERVAL_S), so whatever it serves is reachable again while the node is still frozen."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from mesh.bus import Bus
from mesh.settings import Settings
from tests.support.launcher import Cluster
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

SUBJECT = "test.frozen.echo"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path / "cluster", 3)
    try:
        yield c.start()
    finally:
        c.stop()  # SIGCONT first for a paused node


def _node_of(bus: Bus, cluster: Cluster) -> str:
    at = bus.nc.connected_url
    assert at is not None
    for s in cluster.servers:
        if urlsplit(s.url).port == at.port:
            return s.name or ""
    raise AssertionError(f"connected to {at.port}, not a node of the cluster")


async def test_a_client_on_a_frozen_node_reconnects_elsewhere(
    cluster: Cluster, settings: Settings
) -> None:
    responder = await Bus.connect(cluster.url, name="frozen-responder", settings=settings)
    frozen = _node_of(responder, cluster)
    other = next(s for s in cluster.servers if s.name != frozen)
    requester = await Bus.connect(other.url, name="frozen-requester", settings=settings)
    try:

        async def echo(msg: Msg) -> None:
            await msg.respond(msg.data)

        await responder.nc.subscribe(SUBJECT, cb=echo)
        await responder.nc.flush()

        async def answered() -> bool:
            try:
                reply = await requester.nc.request(SUBJECT, b"ping", timeout=0.5)
            except (NoRespondersError, NatsTimeoutError):
                return False
            return reply.data == b"ping"

        await eventually(answered, "an answer before the pause", timeout=10)
        cluster.pause(frozen)
        # nats-py's default (a ping every 120 s) would leave it deaf for minutes: this bound
        # fails without the short ping interval.
        await eventually(answered, "an answer through another node", timeout=20, every=0.2)
        assert _node_of(responder, cluster) != frozen
        assert frozen in cluster.paused  # reached while the node was still frozen
    finally:
        cluster.resume_all()
        await requester.close()
        await responder.close()
