"""The server enforces who may do what on the bus (mesh.natsauth), tried as outside clients.

Every attack is a plain nats-py client with some identity's nkey (or none), against a real
nats-server configured the way `mesh up` configures it. A refusal is the server's: a
permissions violation it reports for the subject, and the effect absent when the operator
looks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from mesh import envelope, natsauth, subjects
from mesh.bus import Bus, PermissionDeniedError, StreamMessage, read_stream, redact, tail
from mesh.errors import ConfigError, NotConnectedError
from mesh.identity import Identity, IdentityDir, Trust, load_identity, load_trust
from mesh.server import EmbeddedServer, LocalCluster
from mesh.settings import Settings

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
REFUSED_WAIT_S = 3.0  # bound on how long the server may take to report a violation


# -- outside clients ------------------------------------------------------------------------------
class Outsider:
    """A raw nats-py connection (an attacker's, or a role's) that records what the server says."""

    def __init__(self) -> None:
        self.nc = NATS()
        self.errors: list[str] = []
        self.violation = asyncio.Event()

    async def _on_error(self, e: Exception) -> None:
        self.errors.append(str(e))
        if "permissions violation" in str(e).lower():
            self.violation.set()

    async def connect(self, url: str, identity: Identity | None, **extra: Any) -> Outsider:
        opts: dict[str, Any] = {}
        if identity is not None:
            opts = {"nkeys_seed_str": identity.nats_seed, "inbox_prefix": identity.inbox_prefix}
        await self.nc.connect(
            url,
            error_cb=self._on_error,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
            **opts,
            **extra,
        )
        return self

    async def refused(self, attempt: Callable[[], Awaitable[Any]], subject: str) -> None:
        """`attempt` must be refused by the server with a permissions violation naming
        `subject` (case-insensitive, as nats-py reports it), not succeed."""
        self.violation.clear()
        before = len(self.errors)
        task = asyncio.ensure_future(attempt())
        waiter = asyncio.ensure_future(self.violation.wait())
        try:
            done, _ = await asyncio.wait(
                {task, waiter}, timeout=REFUSED_WAIT_S, return_when=asyncio.FIRST_COMPLETED
            )
            if task in done and task.exception() is None:
                raise AssertionError(f"not refused: {subject} went through ({task.result()!r})")
            await asyncio.wait_for(waiter, REFUSED_WAIT_S)
        finally:
            for t in (task, waiter):
                t.cancel()
                with contextlib.suppress(BaseException):
                    await t
        said = " | ".join(self.errors[before:]).lower()
        assert subject.lower() in said, f"violation for another subject: {said}"

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.nc.close()


@contextlib.asynccontextmanager
async def outsider(url: str, identity_file: Path | None) -> AsyncIterator[Outsider]:
    o = Outsider()
    await o.connect(url, load_identity(identity_file) if identity_file else None)
    try:
        yield o
    finally:
        await o.close()


async def refused_to_connect(url: str, identity: Identity | None) -> str:
    """The error a client gets connecting as `identity` (None: anonymous); fails if it got in."""
    o = Outsider()
    try:
        await o.connect(url, identity)
    except Exception as e:
        return f"{e} {' '.join(o.errors)}".lower()
    finally:
        await o.close()
    raise AssertionError("the server let the client in")


def stranger() -> Identity:
    """A well-formed identity the server was never told about (a wrong key)."""
    ids = IdentityDir.init(Path(__import__("tempfile").mkdtemp()) / "identity")
    return load_identity(ids.issue("agent", "security-review"))


# -- the mesh the attacks run against -------------------------------------------------------------
@pytest.fixture(scope="module")
def cast(identities: IdentityDir) -> dict[str, Path]:
    """One identity per role, issued before the module's server starts."""
    return {
        "coordinator": identities.issue("coordinator", "coordinator"),
        "agent": identities.issue("agent", "quality-review"),
        "security": identities.issue("agent", "security-review"),
        "publisher": identities.issue("publisher", "pub-a", tenant="acme"),
        "publisher_b": identities.issue("publisher", "pub-b", tenant="globex"),
        "reader_a": identities.issue("reader", "read-a", tenant="acme"),
        "reader_b": identities.issue("reader", "read-b", tenant="globex"),
    }


@pytest.fixture(scope="module")
def server(cast: dict[str, Path], identities: IdentityDir) -> Any:
    with EmbeddedServer(auth=identities) as s:
        yield s


def as_(identity_file: Path, url: str) -> Settings:
    return Settings(nats_url=url, identity=identity_file, heartbeat_s=0.3, card_ttl_s=1.5)


@pytest.fixture(scope="module")
def seeded(server: EmbeddedServer) -> dict[str, int]:
    """Streams in place (as the operator makes them) with one decision, dead letter and audit
    record per tenant, and a card of security-review."""
    return asyncio.run(_seed(server.url))


async def _seed(url: str) -> dict[str, int]:
    async with await Bus.connect(url) as op:
        await op.ensure()
        for tenant in ("acme", "globex"):
            await op.publish(subjects.decision(tenant, "release", f"ev-{tenant}"), tenant.encode())
            await op.publish(subjects.dlq(tenant, "malformed"), tenant.encode())
            await op.publish(subjects.audit(tenant, "decision"), tenant.encode())
        kv = await op.kv(subjects.CARDS_BUCKET)
        await kv.put(subjects.card_key("security-review", "real"), b'{"real": true}')
        await op.publish_event(envelope.new_event("release.proposed", {"id": "r1"}, tenant="acme"))
        info = await op.js.stream_info(subjects.DECISIONS_STREAM)
        return {"decisions": int(info.state.messages)}


# -- who gets in ----------------------------------------------------------------------------------
async def test_anonymous_and_unknown_keys_are_refused(server: EmbeddedServer) -> None:
    assert "authorization" in await refused_to_connect(server.url, None)
    assert "authorization" in await refused_to_connect(server.url, stranger())


async def test_a_cluster_refuses_anonymous_and_unknown_keys(
    identities: IdentityDir, tmp_path: Path
) -> None:
    async with LocalCluster(3, tmp_path / "cluster", auth=identities) as cluster:
        for url in cluster.urls:
            assert "authorization" in await refused_to_connect(url, None)
            assert "authorization" in await refused_to_connect(url, stranger())
        # The route port takes only the cluster's own servers.
        route = cluster.servers[0].cluster_url
        assert route
        port = int(route.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            info = await reader.readline()
            assert b'"auth_required":true' in info.replace(b" ", b"")
            writer.write(b'CONNECT {"verbose":false}\r\nPING\r\n')
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(200), 5)
            assert b"Authorization Violation" in answer or answer == b""
        finally:
            writer.close()
        async with await Bus.connect(cluster.url) as op:  # the operator does get in
            assert await op.stream_names() is not None
        # An identity issued while the cluster runs is admitted by every node after a reload.
        late = identities.issue("reader", "late-reader", tenant="acme")
        cluster.reload()
        for url in cluster.urls:
            async with outsider(url, late) as o:
                assert o.nc.is_connected


async def test_an_issued_identity_works_on_the_running_server_after_reload(
    identities: IdentityDir, tmp_path: Path
) -> None:
    with EmbeddedServer(tmp_path / "js", auth=identities) as s:
        late = identities.issue("publisher", "late", tenant="acme")
        assert "authorization" in await refused_to_connect(s.url, load_identity(late))
        s.reload()
        async with outsider(s.url, late) as o:
            assert o.nc.is_connected
            identities.revoke(late)
            s.reload()

            async def dropped() -> bool:
                return not o.nc.is_connected

            for _ in range(100):
                if await dropped():
                    break
                await asyncio.sleep(0.05)
            assert not o.nc.is_connected, "a revoked identity stays connected"


def test_no_identity_folder_no_anonymous_server(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mesh.settings import get_settings

    monkeypatch.delenv("MESH_IDENTITY", raising=False)
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    get_settings.cache_clear()
    with pytest.raises(ConfigError, match="without authorization") as err:
        EmbeddedServer()
    assert "MESH_INSECURE=bus" in str(err.value)


async def test_insecure_bus_is_anonymous_and_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mesh.settings import get_settings

    monkeypatch.delenv("MESH_IDENTITY", raising=False)
    monkeypatch.setenv("MESH_HOME", str(tmp_path))
    monkeypatch.setenv("MESH_INSECURE", "bus")
    get_settings.cache_clear()
    with caplog.at_level("WARNING"), EmbeddedServer() as s:
        async with await Bus.connect(s.url) as bus:
            assert bus.identity is None
            await bus.ensure()
    assert "ANONYMOUS" in caplog.text


async def test_no_identity_is_refused_before_connecting(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MESH_IDENTITY", raising=False)
    with pytest.raises(ConfigError, match="no NATS identity") as err:
        await Bus.connect(server.url, settings=Settings(home=tmp_path))
    assert "mesh creds" in str(err.value)


# -- a publisher ----------------------------------------------------------------------------------
async def test_a_publisher_publishes_its_tenants_events_only(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    async with await Bus.connect(settings=as_(cast["publisher"], server.url)) as bus:
        await bus.ensure()  # only checks
        ack = await bus.publish_event(
            envelope.new_event("release.proposed", {"id": "r1"}, tenant="acme")
        )
        assert ack.stream == subjects.EVENTS_STREAM
        # Through the mesh's own API, a refusal is one line that says what to do.
        with pytest.raises(PermissionDeniedError) as err:
            await bus.publish(subjects.event("globex", "release.proposed"), b"{}", timeout=1)
        assert "publisher:pub-a" in str(err.value) and "--tenant globex" in str(err.value)
    async with outsider(server.url, cast["publisher"]) as o:
        js = o.nc.jetstream(timeout=1)
        other = subjects.event("globex", "release.proposed")
        await o.refused(lambda: js.publish(other, b"{}"), other)
        forged = subjects.decision("acme", "release", "ev-forged")
        await o.refused(lambda: js.publish(forged, b"approved"), forged)
        ledger = f"$KV.{subjects.DECISIONS_BUCKET}.acme.ev-forged"
        await o.refused(lambda: js.publish(ledger, b"{}"), ledger)
        audit = subjects.audit("acme", "decision")
        await o.refused(lambda: js.publish(audit, b"{}"), audit)
    async with await Bus.connect(server.url) as op:
        info = await op.js.stream_info(subjects.DECISIONS_STREAM)
        assert info.state.messages == seeded["decisions"]


async def test_a_publisher_cannot_take_another_tenants_event_id(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    """JetStream de-duplicates message ids per stream: a publisher of acme publishing (on its
    own subjects) under the id globex's next event will have must not make the server drop
    globex's event as a duplicate. Both id shapes an attacker could try are taken first."""
    victim_id = "ticket-4711"
    async with await Bus.connect(settings=as_(cast["publisher"], server.url)) as attacker:
        squat = subjects.event("acme", "release.proposed")
        for msg_id in (
            subjects.event_msg_id("globex", victim_id),  # the untagged shape
            attacker.event_msg_id("globex", victim_id),  # tagged with the attacker's own key
        ):
            ack = await attacker.publish(squat, b"{}", msg_id=msg_id)
            assert not ack.duplicate
    event = envelope.new_event(
        "release.proposed", {"id": "r9"}, tenant="globex", event_id=victim_id
    )
    async with await Bus.connect(settings=as_(cast["publisher_b"], server.url)) as victim:
        first = await victim.publish_event(event)
        assert not first.duplicate, "another tenant's message took this event's id"
        # Its own re-publish (a retry after a crash) is still a duplicate, as promised.
        again = await victim.publish_event(event)
        assert again.duplicate and again.seq == first.seq


MESH_STREAMS = [
    subjects.EVENTS_STREAM,
    subjects.DECISIONS_STREAM,
    subjects.DLQ_STREAM,
    subjects.AUDIT_STREAM,
    subjects.CHECKPOINTS_STREAM,
    subjects.kv_stream(subjects.CARDS_BUCKET),
    subjects.kv_stream(subjects.DECISIONS_BUCKET),
    subjects.kv_stream(subjects.TASKS_BUCKET),
]


@pytest.mark.parametrize("who", ["publisher", "reader_a", "agent", "coordinator"])
async def test_nobody_but_the_operator_purges_deletes_or_reconfigures_a_stream(
    who: str, server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    async with await Bus.connect(server.url) as op:
        before = {s: (await op.js.stream_info(s)).state.messages for s in MESH_STREAMS}
        configs = {s: (await op.js.stream_info(s)).config for s in MESH_STREAMS}
    async with outsider(server.url, cast[who]) as o:
        js = o.nc.jetstream(timeout=1)
        for stream in MESH_STREAMS:
            await o.refused(lambda s=stream: js.purge_stream(s), f"$JS.API.STREAM.PURGE.{stream}")
            await o.refused(lambda s=stream: js.delete_stream(s), f"$JS.API.STREAM.DELETE.{stream}")
            shrunk = configs[stream].evolve(max_msgs_per_subject=1, max_age=1.0)
            await o.refused(lambda c=shrunk: js.update_stream(c), f"$JS.API.STREAM.UPDATE.{stream}")
            await o.refused(
                lambda s=stream: js.delete_msg(s, 1), f"$JS.API.STREAM.MSG.DELETE.{stream}"
            )
        await o.refused(
            lambda: js.add_stream(StreamConfig(name="MESH_SHADOW", subjects=["mesh.x.>"])),
            "$JS.API.STREAM.CREATE.MESH_SHADOW",
        )
    async with await Bus.connect(server.url) as op:
        after = {s: (await op.js.stream_info(s)).state.messages for s in MESH_STREAMS}
    assert all(after[s] >= before[s] for s in MESH_STREAMS), (before, after)


# -- an agent -------------------------------------------------------------------------------------
async def test_an_agent_cannot_serve_or_register_as_another(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    async with outsider(server.url, cast["agent"]) as o:
        for subject in ("mesh.a2a.security-review", "mesh.a2a.security-review.i1", "mesh.a2a.>"):
            await o.refused(lambda s=subject: _subscribe(o.nc, s), subject)
        js = o.nc.jetstream(timeout=1)
        card = f"$KV.{subjects.CARDS_BUCKET}.security-review.impostor"
        await o.refused(lambda: js.publish(card, b"{}"), card)
        real = f"$KV.{subjects.CARDS_BUCKET}.security-review.real"
        await o.refused(lambda: js.publish(real, b"{}"), real)
        tasks = f"$KV.{subjects.TASKS_BUCKET}.security-review.t1"
        await o.refused(lambda: js.publish(tasks, b"{}"), tasks)
        # Another agent's task keys are not readable either (direct gets name the key).
        get = f"$JS.API.DIRECT.GET.KV_{subjects.TASKS_BUCKET}.$KV.{subjects.TASKS_BUCKET}.x.t1"
        await o.refused(lambda: o.nc.request(get, b"", timeout=1), get)
        # Nor the coordinator's durable.
        durable = f"$JS.API.CONSUMER.MSG.NEXT.{subjects.EVENTS_STREAM}.coordinator"
        await o.refused(lambda: o.nc.request(durable, b"{}", timeout=1), durable)
        # Nor someone else's reply inbox.
        await o.refused(lambda: _subscribe(o.nc, "_INBOX.>"), "_INBOX.>")
    async with await Bus.connect(server.url) as op:
        kv = await op.kv(subjects.CARDS_BUCKET)
        assert (await kv.get(subjects.card_key("security-review", "real"))).value == (
            b'{"real": true}'
        )
        keys = await kv.keys()
        assert "security-review.impostor" not in keys


@pytest.mark.parametrize(
    ("who", "key"),
    [
        ("agent", f"$KV.{subjects.CARDS_BUCKET}.quality-review.mine"),
        ("agent", f"$KV.{subjects.TASKS_BUCKET}.quality-review.mine"),
        ("coordinator", f"$KV.{subjects.DECISIONS_BUCKET}.acme.mine"),
    ],
)
async def test_a_writer_cannot_erase_a_bucket_through_its_own_key(
    who: str, key: str, server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    """Permissions pin a writer to its keys, but a `Nats-Rollup: all` header on one of them
    would erase every other key of the bucket: the mesh's buckets refuse rollups."""
    from nats.js.errors import APIError

    stream = f"KV_{key.split('.')[1]}"
    async with await Bus.connect(server.url) as op:
        await op.js.publish(key.replace("mine", "other"), b"someone else's")
        before = (await op.js.stream_info(stream)).state.messages
    async with outsider(server.url, cast[who]) as o:
        with pytest.raises(APIError, match="rollup"):
            await o.nc.jetstream(timeout=2).publish(key, b"x", headers={"Nats-Rollup": "all"})
    async with await Bus.connect(server.url) as op:
        assert (await op.js.stream_info(stream)).state.messages == before


async def _subscribe(nc: NATS, subject: str) -> Any:
    sub = await nc.subscribe(subject)
    await nc.flush()
    await asyncio.sleep(0.2)  # the server answers a refused SUB asynchronously
    return sub


async def test_an_agent_works_under_its_own_permissions(
    server: EmbeddedServer,
    seeded: dict[str, int],
    cast: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Served, registered, called by the coordinator (a unary call, and a stream the caller
    cancels early), its tasks listed (a KV watch, whose consumer must carry its filter in the
    API subject), all as its own identity, without a single refusal from the server."""
    from a2a.types import ListTasksRequest, SendMessageRequest

    from agents.quality_review.agent import agent
    from mesh.a2a.client import AgentClient, user_message
    from mesh.registry import Registry

    release = json.loads((REPO / "agents/samples/release_clean.json").read_text())
    async with (
        await Bus.connect(settings=as_(cast["agent"], server.url)) as agent_bus,
        await Bus.connect(settings=as_(cast["coordinator"], server.url)) as coord,
        agent.serve(agent_bus, http=False, settings=agent_bus.settings),
    ):
        live = await Registry(coord).live()
        assert "quality-review" in {r.agent for r in live}
        client = AgentClient(coord)
        task = await client.send("quality-review", user_message(data=release), timeout=10)
        assert task is not None
        listed = await client.transport("quality-review").list_tasks(ListTasksRequest())
        assert listed is not None
        # A streamed answer, stopped after its first frame: the caller's cancel goes to
        # `<its inbox>.cancel`, which the agent may subscribe to.
        stream = client.transport("quality-review").send_message_streaming(
            SendMessageRequest(message=user_message(data=release))
        )
        async for _ in stream:
            break
        await stream.aclose()
        await coord.nc.flush()
    refusals = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    assert not refusals, refusals


async def test_an_event_handling_agent_works_under_its_own_permissions(
    server: EmbeddedServer,
    seeded: dict[str, int],
    identities: IdentityDir,
    cast: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The triage agent as its own identity: its handler's durable on MESH_EVENTS, fetches,
    acks, and the output event it publishes (signed by it); the input from a publisher."""
    from agents.triage.agent import agent as triage

    triage_identity = identities.issue("agent", "triage")
    server.reload()
    ticket = {
        "id": "T-7",
        "title": "Checkout is down",
        "body": "500s since 09:12",
        "reporter": "ops@acme.example",
        "service": "checkout",
        "customer_tier": "enterprise",
    }
    async with (
        await Bus.connect(settings=as_(triage_identity, server.url)) as agent_bus,
        await Bus.connect(settings=as_(cast["publisher"], server.url)) as publisher,
        await Bus.connect(server.url) as op,
    ):
        triaged: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_event(msg: Any) -> None:
            await triaged.put(msg.headers.get(subjects.H_SIGNATURE, "") if msg.headers else "")

        await op.nc.subscribe(subjects.event("acme", "ticket.triaged"), cb=on_event)
        await op.nc.flush()
        async with triage.serve(agent_bus, http=False, settings=agent_bus.settings):
            await publisher.publish_event(
                envelope.new_event("ticket.created", ticket, tenant="acme")
            )
            signature = await asyncio.wait_for(triaged.get(), 20)
    kid = str(signature).partition(":")[0]
    assert load_trust(identities.trust_path).keys[kid].name == "triage"
    refusals = [r.getMessage() for r in caplog.records if "violation" in r.getMessage().lower()]
    assert not refusals, refusals


# -- a reader -------------------------------------------------------------------------------------
async def test_a_reader_reads_its_tenant_only(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    async with await Bus.connect(settings=as_(cast["reader_b"], server.url)) as bus:
        for stream in (subjects.DECISIONS_STREAM, subjects.DLQ_STREAM, subjects.AUDIT_STREAM):
            rows = await tail(bus, stream, 50)
            assert rows and {body for _, _, body in rows} == {b"globex"}, (stream, rows)
            everything = await read_stream(bus, stream)
            assert {m.data for m in everything} == {b"globex"}
    async with outsider(server.url, cast["reader_b"]) as o:
        js = o.nc.jetstream(timeout=1)
        for stream, theirs in (
            (subjects.DECISIONS_STREAM, "mesh.decision.acme.>"),
            (subjects.DLQ_STREAM, "mesh.dlq.acme.>"),
            (subjects.AUDIT_STREAM, "mesh.audit.acme.>"),
            (subjects.CHECKPOINTS_STREAM, "mesh.checkpoint.acme"),
        ):
            pinned = f"$JS.API.CONSUMER.CREATE.{stream}.steal.{theirs}"
            await o.refused(
                lambda s=stream, f=theirs: js.add_consumer(
                    s, ConsumerConfig(name="steal", filter_subject=f, ack_policy=AckPolicy.NONE)
                ),
                pinned,
            )
            unfiltered = f"$JS.API.CONSUMER.CREATE.{stream}.steal"
            await o.refused(
                lambda s=stream: js.add_consumer(
                    s, ConsumerConfig(name="steal", ack_policy=AckPolicy.NONE)
                ),
                unfiltered,
            )
            await o.refused(lambda s=stream: js.get_msg(s, 1), f"$JS.API.STREAM.MSG.GET.{stream}")
            await o.refused(
                lambda s=stream, f=theirs: js.get_last_msg(s, f.replace(">", "x"), direct=True),
                f"$JS.API.DIRECT.GET.{stream}",
            )
            durable = f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.steal"
            await o.refused(lambda d=durable: o.nc.request(d, b"{}", timeout=1), durable)
        # Its own tenant's filter with someone else's inside the request is refused by
        # JetStream itself: the filter in the subject must be the one in the request.
        inbox = o.nc.new_inbox()
        sub = await o.nc.subscribe(inbox)
        for config in (
            {"name": "mix", "filter_subject": "mesh.decision.acme.>"},
            {"name": "mix", "filter_subjects": ["mesh.decision.acme.>"]},
        ):
            request = {"stream_name": subjects.DECISIONS_STREAM, "config": config}
            await o.nc.publish(
                f"$JS.API.CONSUMER.CREATE.{subjects.DECISIONS_STREAM}.mix.mesh.decision.globex.>",
                json.dumps(request).encode(),
                reply=inbox,
            )
            answer = json.loads((await sub.next_msg(REFUSED_WAIT_S)).data)
            assert "error" in answer, answer


async def test_a_reader_sees_no_ones_events_or_tasks(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    async with outsider(server.url, cast["reader_a"]) as o:
        await o.refused(lambda: _subscribe(o.nc, "mesh.evt.>"), "mesh.evt.>")
        await o.refused(lambda: _subscribe(o.nc, "mesh.decision.acme.>"), "mesh.decision.acme.>")
        stream = subjects.EVENTS_STREAM
        subject = f"$JS.API.CONSUMER.CREATE.{stream}.peek.mesh.evt.acme.>"
        await o.refused(lambda: o.nc.request(subject, b"{}", timeout=1), subject)


async def test_an_agent_cannot_list_other_agents_tasks_or_the_tenants_event_subjects(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path]
) -> None:
    """STREAM.INFO with a subjects filter lists a stream's subjects, whatever a role's other
    permissions pin: the tasks bucket's keys name agent, caller and task (who calls whom, how
    often), the events stream's subjects every tenant and event type. An agent may ask for
    neither (it binds the tasks bucket without it, `Bus.kv`)."""
    async with await Bus.connect(server.url) as op:
        kv = await op.kv(subjects.TASKS_BUCKET)
        await kv.put("quality-review.someone.t1", b"{}")
    async with outsider(server.url, cast["security"]) as o:
        query = json.dumps({"subjects_filter": ">"}).encode()
        for stream in (subjects.kv_stream(subjects.TASKS_BUCKET), subjects.EVENTS_STREAM):
            subject = f"$JS.API.STREAM.INFO.{stream}"
            await o.refused(lambda s=subject: o.nc.request(s, query, timeout=1), subject)


# -- TLS and secrets ------------------------------------------------------------------------------
async def test_tls_url_refuses_a_plaintext_server(server: EmbeddedServer) -> None:
    plain = server.url.replace("nats://", "tls://")
    with pytest.raises(NotConnectedError) as err:
        await Bus.connect(plain, connect_timeout_s=3)
    assert "tls://" in str(err.value) and "handshake_first" in str(err.value)


async def test_tls_url_connects_to_a_tls_server(identities: IdentityDir, tmp_path: Path) -> None:
    from mesh.cli.creds import issue_tls

    certs = issue_tls(tmp_path / "tls", servers=["localhost"], clients=["client"])
    config = (
        "tls {\n"
        f'  cert_file: "{certs / "localhost.pem"}"\n'
        f'  key_file: "{certs / "localhost-key.pem"}"\n'
        f'  ca_file: "{certs / "ca.pem"}"\n'
        "  verify: true\n"
        "  handshake_first: true\n"
        "}"
    )
    with EmbeddedServer(tmp_path / "js", auth=identities, config=config) as s:
        url = s.url.replace("nats://127.0.0.1", "tls://localhost")
        settings = Settings(
            tls_ca=certs / "ca.pem",
            tls_cert=certs / "client.pem",
            tls_key=certs / "client-key.pem",
        )
        async with await Bus.connect(url, settings=settings) as bus:
            assert bus.nc.is_connected
        # Without the client certificate (mTLS), refused.
        with pytest.raises(NotConnectedError):
            await Bus.connect(url, settings=Settings(tls_ca=certs / "ca.pem"), connect_timeout_s=3)
        # A plaintext client gets nothing either.
        assert await refused_to_connect(s.url, load_identity(identities.operator_path))


async def test_passwords_never_appear_in_errors(server: EmbeddedServer) -> None:
    from mesh.server import free_port

    secret = "s3cr3t-Passw0rd"
    for url in (
        f"nats://admin:{secret}@127.0.0.1:{free_port()}",
        server.url.replace("nats://", f"nats://admin:{secret}@"),
        f"nats://{secret}@127.0.0.1:{free_port()}",
    ):
        try:
            async with await Bus.connect(url, connect_timeout_s=2):
                pass
        except NotConnectedError as e:
            assert secret not in str(e) and secret not in repr(e), str(e)
    assert redact(f"cannot reach nats://u:{secret}@h:1, tls://{secret}@h:2") == (
        "cannot reach nats://***@h:1, tls://***@h:2"
    )
    assert redact("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"


# -- events are signed ----------------------------------------------------------------------------
async def test_published_events_carry_the_publishers_signature(
    server: EmbeddedServer, seeded: dict[str, int], cast: dict[str, Path], identities: IdentityDir
) -> None:
    event = envelope.new_event("release.proposed", {"id": "r1", "n": 1}, tenant="acme")
    async with await Bus.connect(settings=as_(cast["publisher"], server.url)) as bus:
        await bus.publish_event(event)
    async with await Bus.connect(server.url) as op:
        got: list[StreamMessage] = await read_stream(
            op, subjects.EVENTS_STREAM, filter_subject=subjects.event("acme", ">")
        )
    mine = [m for m in got if event.id.encode() in m.data]
    assert len(mine) == 1
    kid, _, sig = mine[0].headers[subjects.H_SIGNATURE].partition(":")
    trust: Trust = load_trust(identities.trust_path)
    payload = mine[0].subject.encode() + b"\0" + mine[0].data
    assert trust.refusal(kid, "event", payload, sig) is None
    assert trust.keys[kid].name == "pub-a"
    assert trust.refusal(kid, "event", payload + b"x", sig) == "signature does not verify"


def test_permission_table_is_whole() -> None:
    """Every role has a table entry; the operator alone has none (it may do everything)."""
    from mesh.identity import ROLES, NatsUser

    for role in ROLES:
        user = NatsUser(nkey="U" + "A" * 55, role=role, name="x", tenant="t")
        perms = natsauth.permissions(user)
        if role == "operator":
            assert perms == {}
            continue
        assert set(natsauth.ADMIN) <= set(perms["publish"]["deny"])
        assert not any(p in (">", "$JS.API.>") for p in perms["publish"]["allow"])
    assert msgspec.json.decode(b"{}") == {}


async def test_only_the_operator_creates_streams_the_others_say_what_to_do(
    identities: IdentityDir, cast: dict[str, Path], tmp_path: Path
) -> None:
    with EmbeddedServer(tmp_path / "js", auth=identities) as fresh:
        for who in ("coordinator", "agent", "publisher", "reader_a"):
            async with await Bus.connect(settings=as_(cast[who], fresh.url)) as bus:
                with pytest.raises(ConfigError) as err:
                    await bus.ensure()
                message = str(err.value)
                assert "may not create streams" in message and "mesh ensure" in message, message
                assert "\n" not in err.value.message  # one line, then the hint
        async with await Bus.connect(fresh.url) as op:
            await op.ensure()
            names = await op.stream_names()
            info = await op.js.stream_info(f"KV_{subjects.TASKS_BUCKET}")
        assert {subjects.CHECKPOINTS_STREAM, f"KV_{subjects.TASKS_BUCKET}"} <= names
        assert info.config.allow_direct  # reads pinned per key are direct gets
        async with await Bus.connect(settings=as_(cast["agent"], fresh.url)) as bus:
            await bus.ensure()  # now only checks, and finds everything
            kv = await bus.kv(subjects.TASKS_BUCKET)  # bound without asking for its info
            await kv.put("quality-review.me.t1", b"mine")
            assert (await kv.get("quality-review.me.t1")).value == b"mine"


async def test_log_lines_never_show_a_password(caplog: pytest.LogCaptureFixture) -> None:
    from mesh.bus import _log_error

    with caplog.at_level("WARNING"):
        await _log_error(Exception("lost nats://admin:hunter2@10.0.0.1:4222, retrying"))
    assert "hunter2" not in caplog.text and "nats://***@10.0.0.1:4222" in caplog.text


async def test_nats_creds_file_connects_without_an_identity(
    server: EmbeddedServer, cast: dict[str, Path], tmp_path: Path
) -> None:
    """MESH_NATS_CREDS: an nkey seed file (as for joining a server someone else runs); the
    connection gets the inboxes of that key. Readable by others, it is refused."""
    from mesh.bus import connect_options

    publisher = load_identity(cast["publisher"])
    seed = tmp_path / "user.nk"
    seed.write_text(publisher.nats_seed + "\n")
    seed.chmod(0o600)
    settings = Settings(nats_creds=seed, identity=None, home=tmp_path)
    opts = connect_options(settings, None, [server.url])
    assert opts["nkeys_seed"] == str(seed) and opts["inbox_prefix"] == publisher.inbox_prefix
    async with await Bus.connect(server.url, settings=settings) as bus:
        assert bus.identity is None and not bus.is_operator  # nothing signs, nothing created
        await bus.ensure()  # only checks
        ack = await bus.js.publish(subjects.event("acme", "x.y"), b"{}")
        assert ack.stream == subjects.EVENTS_STREAM
    jwt = tmp_path / "user.creds"
    jwt.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAi.x.y\n------END NATS USER JWT------\n\n"
        f"-----BEGIN USER NKEY SEED-----\n{publisher.nats_seed}\n------END USER NKEY SEED------\n"
    )
    jwt.chmod(0o600)
    opts = connect_options(Settings(nats_creds=jwt), None, [server.url])
    assert opts["user_credentials"] == str(jwt) and opts["inbox_prefix"] == publisher.inbox_prefix
    seed.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        connect_options(Settings(nats_creds=seed), None, [server.url])
