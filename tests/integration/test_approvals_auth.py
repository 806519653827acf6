"""A person (identity role `human`) on the bus: answers its own tenant's approval requests and
reads them, nothing else; the server enforces it (mesh.natsauth)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from mesh import subjects
from mesh.bus import Bus, read_stream
from mesh.identity import IdentityDir
from mesh.server import EmbeddedServer
from tests.integration.test_nats_auth import as_, outsider

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def people(identities: IdentityDir) -> dict[str, Path]:
    return {
        "alice": identities.issue("human", "alice-auth", tenant="acme", claims=["cso"]),
        "bob": identities.issue("human", "bob-auth", tenant="globex", claims=["cso"]),
    }


@pytest.fixture(scope="module")
def server(people: dict[str, Path], identities: IdentityDir) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(auth=identities) as s:
        asyncio.run(_seed(s.url))
        yield s


async def _seed(url: str) -> None:
    async with await Bus.connect(url) as op:
        await op.ensure()
        for tenant in ("acme", "globex"):
            await op.publish(subjects.approval(tenant, "req", "ev.cso"), tenant.encode())


async def test_a_person_answers_and_reads_its_own_tenants_approvals_only(
    server: EmbeddedServer, people: dict[str, Path]
) -> None:
    async with await Bus.connect(settings=as_(people["alice"], server.url)) as bus:
        await bus.ensure()  # only checks that the streams exist
        ack = await bus.publish(subjects.approval("acme", "vote", "ev.cso"), b"{}")
        assert ack.stream == subjects.APPROVALS_STREAM
        mine = await read_stream(
            bus, subjects.APPROVALS_STREAM, filter_subject=subjects.approvals_filter("acme")
        )
        assert {m.data for m in mine} >= {b"acme"} and b"globex" not in {m.data for m in mine}
    async with outsider(server.url, people["alice"]) as o:
        js = o.nc.jetstream(timeout=1)
        for subject in (
            subjects.approval("globex", "vote", "ev.cso"),  # another tenant's
            subjects.approval("acme", "req", "ev.cso"),  # a request: the coordinator's
            subjects.approval("acme", "receipt", "ev.cso"),
            subjects.decision("acme", "med", "ev"),
        ):
            await o.refused(lambda s=subject: js.publish(s, b"{}"), subject)
        theirs = subjects.approvals_filter("globex")
        await o.refused(
            lambda: js.add_consumer(
                subjects.APPROVALS_STREAM,
                ConsumerConfig(name="steal", filter_subject=theirs, ack_policy=AckPolicy.NONE),
            ),
            f"$JS.API.CONSUMER.CREATE.{subjects.APPROVALS_STREAM}.steal.{theirs}",
        )
        durable = (
            f"$JS.API.CONSUMER.CREATE.{subjects.APPROVALS_STREAM}.{subjects.APPROVALS_DURABLE}"
        )
        await o.refused(lambda: o.nc.request(durable, b"{}", timeout=1), durable)
        # Not the coordinators' durable (their timers), not even with its own tenant's filter.
        pinned = f"{durable}.{subjects.APPROVALS_ROOT}.acme.>"
        await o.refused(lambda: o.nc.request(pinned, b"{}", timeout=1), pinned)
