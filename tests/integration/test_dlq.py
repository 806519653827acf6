"""Advisory dead letters, replay and purge on a real nats-server; the `mesh dlq` commands."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig
from typer.testing import CliRunner

from coordinator import dlq
from coordinator.dlq import AdvisoryDeadLetters
from mesh import envelope, subjects
from mesh.bus import Bus
from mesh.cli import app
from mesh.errors import ConfigError
from mesh.records import DeadLetter, encoder
from mesh.server import EmbeddedServer
from mesh.settings import Settings, get_settings
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


# -- helpers ----------------------------------------------------------------------------------
async def publish(
    bus: Bus, event_type: str = "vote.test", data: Any = None, *, tenant: str = "acme"
) -> tuple[envelope.Event, int]:
    """A real event with a traceparent; returns it and its sequence in MESH_EVENTS."""
    event = envelope.new_event(event_type, data or {"n": 1}, tenant=tenant)
    event.traceparent = TRACEPARENT
    ack = await bus.publish_event(event)
    return event, ack.seq


async def consumer(bus: Bus, durable: str, subject: str, max_deliver: int = -1) -> Any:
    return await bus.js.pull_subscribe(
        subject,
        durable=durable,
        stream=subjects.EVENTS_STREAM,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_deliver=max_deliver),
    )


async def nak_until_dead_lettered(bus: Bus, durable: str, subject: str, max_deliver: int) -> int:
    """Nak (no delay) every delivery, pulling on like a live consumer, until the DLQ has a record.

    Pulling on matters: for a pull consumer nats-server sends MAX_DELIVERIES only when it next
    has a pull request to serve after the last allowed delivery. Returns the deliveries seen.
    """
    psub = await consumer(bus, durable, subject, max_deliver)
    deliveries = 0

    async def pulled_until_recorded() -> bool:
        nonlocal deliveries
        with contextlib.suppress(TimeoutError):
            for m in await psub.fetch(1, timeout=0.2):
                deliveries += 1
                await m.nak()
        return bool(await records(bus))

    try:
        await eventually(pulled_until_recorded)
    finally:
        await psub.unsubscribe()
    return deliveries


async def take_one(bus: Bus, durable: str, subject: str) -> tuple[Any, Msg]:
    psub = await consumer(bus, durable, subject)
    [m] = await psub.fetch(1, timeout=5)
    return psub, m


async def terminate(bus: Bus, durable: str, subject: str, reason: str | None = None) -> None:
    psub, m = await take_one(bus, durable, subject)
    try:
        if reason is None:
            await m.term()
        else:
            # nats-py 2.16's Msg.term() takes no reason; the protocol does (`+TERM <reason>`).
            await bus.nc.publish(m.reply, b"+TERM " + reason.encode())
            await bus.nc.flush()
    finally:
        await psub.unsubscribe()


def without_msg_id(headers: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != subjects.H_MSG_ID}


async def records(bus: Bus, reason: str | None = None) -> list[tuple[int, DeadLetter]]:
    return await dlq.latest(bus, limit=1000, reason=reason)


async def wait_records(bus: Bus, count: int) -> list[tuple[int, DeadLetter]]:
    async def enough() -> bool:
        return len(await records(bus)) >= count

    await eventually(enough)
    return await records(bus)


async def settle(*instances: AdvisoryDeadLetters) -> None:
    """After a round trip on each connection, everything the server sent it is queued locally;
    then wait until it is handled. No sleeping: this is a barrier, not a guess."""
    for adl in instances:
        await adl.bus.nc.flush()

    async def idle() -> bool:
        return all(adl.idle for adl in instances)

    await eventually(idle)


@pytest.fixture
async def adl(bus: Bus) -> AsyncIterator[AdvisoryDeadLetters]:
    async with AdvisoryDeadLetters(bus) as a:
        yield a


# -- advisories → dead letters ----------------------------------------------------------------
async def test_max_deliveries_becomes_a_dead_letter(bus: Bus, adl: AdvisoryDeadLetters) -> None:
    seen: list[dict[str, Any]] = []

    async def spy(msg: Msg) -> None:
        seen.append(json.loads(msg.data))

    # The raw advisory, to pin the payload fields this code relies on.
    await bus.nc.subscribe(dlq.advisory_subjects()[0], cb=spy)
    event, seq = await publish(bus, "vote.test", {"x": "é"})
    original = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)

    subject = subjects.event("acme", "vote.test")
    assert await nak_until_dead_lettered(bus, "naker", subject, max_deliver=2) == 2

    [(_, d)] = await wait_records(bus, 1)
    assert d.reason == "max_deliveries"
    assert d.attempts == 2
    assert d.stream_seq == seq
    assert d.body == original.data  # byte-identical
    assert d.subject == subjects.event("acme", "vote.test")
    assert d.tenant == "acme"
    assert (d.event_id, d.event_type) == (event.id, "vote.test")
    assert d.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    # The headers as stored (with a tracer provider set by an earlier test, the publisher's
    # own span id replaces the one given: same trace).
    assert original.headers is not None
    assert d.headers[subjects.H_TRACEPARENT] == original.headers[subjects.H_TRACEPARENT]
    assert TRACE_ID in d.headers[subjects.H_TRACEPARENT]
    # The publisher's message id, tagged with its key (subjects.event_msg_id).
    assert d.headers[subjects.H_MSG_ID].startswith("acme~")
    assert subjects.event_id_of_msg_id("acme", d.headers[subjects.H_MSG_ID]) == event.id
    assert "'naker'" in d.error and "2 deliveries" in d.error
    assert d.at > 0

    async def spied() -> bool:
        return bool(seen)

    await eventually(spied)
    adv = seen[0]
    assert adv["type"] == "io.nats.jetstream.advisory.v1.max_deliver"
    assert {k: adv[k] for k in ("stream", "consumer", "stream_seq", "deliveries")} == {
        "stream": subjects.EVENTS_STREAM,
        "consumer": "naker",
        "stream_seq": seq,
        "deliveries": 2,
    }
    assert adv["id"] and adv["timestamp"]
    assert adl.stats.recorded == 1


async def test_term_becomes_a_terminated_dead_letter(bus: Bus, adl: AdvisoryDeadLetters) -> None:
    event, seq = await publish(bus)
    await terminate(bus, "termer", subjects.event("acme", "vote.test"))

    [(_, d)] = await wait_records(bus, 1)
    assert d.reason == "terminated"
    assert d.attempts == 1
    assert d.stream_seq == seq
    assert d.event_id == event.id
    assert "'termer'" in d.error and "no reason given" in d.error


async def test_term_reason_is_kept(bus: Bus, adl: AdvisoryDeadLetters) -> None:
    # Pinned so this test is revisited when nats-py grows term(reason=...).
    assert "reason" not in inspect.signature(Msg.term).parameters
    await publish(bus)
    await terminate(bus, "termer", subjects.event("acme", "vote.test"), reason="schema v0 refused")

    [(_, d)] = await wait_records(bus, 1)
    assert d.reason == "terminated"
    assert d.error.endswith("schema v0 refused")


async def test_body_that_is_not_an_envelope_is_kept_as_is(
    bus: Bus, adl: AdvisoryDeadLetters
) -> None:
    subject = subjects.event("acme", "raw.thing")
    await bus.publish(subject, b"\x00not json\xff", msg_id="raw-1")
    await terminate(bus, "termer", subject)

    [(_, d)] = await wait_records(bus, 1)
    assert d.body == b"\x00not json\xff"
    assert d.event_id is None
    assert d.event_type == "raw.thing"  # from the subject
    # The trace its publisher's send span started, if a tracer provider is set (none: None).
    original = await bus.js.get_msg(subjects.EVENTS_STREAM, d.stream_seq)
    traceparent = (original.headers or {}).get(subjects.H_TRACEPARENT)
    assert d.trace_id == (traceparent.split("-")[1] if traceparent else None)


async def test_deleted_original_is_recorded_with_empty_body(
    bus: Bus, adl: AdvisoryDeadLetters
) -> None:
    _, seq = await publish(bus)
    psub, _ = await take_one(bus, "holder", subjects.event("acme", "vote.test"))
    try:
        # nats-server terminates a pending message that is deleted (and says so, as a reason).
        await bus.js.delete_msg(subjects.EVENTS_STREAM, seq)
        [(_, d)] = await wait_records(bus, 1)
    finally:
        await psub.unsubscribe()
    assert d.reason == "terminated"
    assert d.body == b""
    assert d.subject == ""
    assert d.tenant == "unknown"
    assert d.stream_seq == seq
    assert "no longer in MESH_EVENTS" in d.error


async def test_a_malformed_advisory_is_logged_not_fatal(
    bus: Bus, adl: AdvisoryDeadLetters, caplog: pytest.LogCaptureFixture
) -> None:
    await bus.nc.publish(
        f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{subjects.EVENTS_STREAM}.x", b"{"
    )

    # Waited on, not settled: a client's publish on $JS.EVENT.> reaches subscribers
    # asynchronously, after a flush has returned.
    async def failed() -> bool:
        return adl.stats.failed == 1

    await eventually(failed)
    assert "could not be dead-lettered" in caplog.text
    # ...and the subscription still works.
    await publish(bus)
    await terminate(bus, "termer", subjects.event("acme", "vote.test"))
    await wait_records(bus, 1)


async def test_two_coordinators_record_each_advisory_once(
    bus: Bus, nats_server: EmbeddedServer, settings: Settings
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        instances = []
        for name in ("c1", "c2"):
            b = await stack.enter_async_context(
                await Bus.connect(nats_server.url, name=name, settings=settings)
            )
            instances.append(await stack.enter_async_context(AdvisoryDeadLetters(b)))
        for i in range(3):
            await publish(bus, f"vote.t{i}")
            await terminate(bus, f"termer{i}", subjects.event("acme", f"vote.t{i}"))

        await wait_records(bus, 3)
        await settle(*instances)
        assert len(await records(bus)) == 3
        # The queue group handed each advisory to one instance; none was even seen twice.
        assert sum(a.stats.received for a in instances) == 3
        assert sum(a.stats.duplicates for a in instances) == 0


async def test_same_advisory_twice_is_one_record(bus: Bus, adl: AdvisoryDeadLetters) -> None:
    _, seq = await publish(bus)
    advisory = {
        "type": "io.nats.jetstream.advisory.v1.terminated",
        "stream": subjects.EVENTS_STREAM,
        "consumer": "x",
        "stream_seq": seq,
        "deliveries": 1,
    }
    payload = json.dumps(advisory).encode()
    subject = f"$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.{subjects.EVENTS_STREAM}.x"
    await adl.handle(subject, payload)
    await adl.handle(subject, payload)
    assert len(await records(bus)) == 1
    assert (adl.stats.recorded, adl.stats.duplicates) == (1, 1)


# -- replay, get, purge -----------------------------------------------------------------------
async def test_replay_republishes_the_original(bus: Bus, adl: AdvisoryDeadLetters) -> None:
    event, seq = await publish(bus)
    await terminate(bus, "termer", subjects.event("acme", "vote.test"))
    [(dlq_seq, d)] = await wait_records(bus, 1)

    msg_id = await dlq.replay(bus, dlq_seq)
    assert msg_id.startswith(f"replay:{dlq_seq}:")
    again = await dlq.replay(bus, dlq_seq)
    assert again != msg_id  # a second replay is a new message too, not deduplicated

    info = await bus.js.stream_info(subjects.EVENTS_STREAM)
    assert info.state.messages == 3
    original = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
    replayed = await bus.js.get_msg(subjects.EVENTS_STREAM, seq + 1)
    assert replayed.subject == original.subject == d.subject
    assert replayed.data == original.data
    assert replayed.headers[subjects.H_MSG_ID] == msg_id
    # Every header kept but the traceparent, which continues the original's trace.
    kept, was = without_msg_id(replayed.headers), without_msg_id(original.headers)
    assert kept.pop(subjects.H_TRACEPARENT).split("-")[1] == TRACE_ID
    assert was.pop(subjects.H_TRACEPARENT).split("-")[1] == TRACE_ID
    assert kept == was
    assert envelope.decode(replayed.data).id == event.id


async def test_a_binary_mode_event_is_recorded_and_replayed_with_its_headers(
    bus: Bus, adl: AdvisoryDeadLetters
) -> None:
    event = envelope.new_event("vote.test", {"n": 1}, tenant="acme")
    seq = (await bus.publish_event(event, binary=True)).seq
    await terminate(bus, "termer", subjects.event("acme", "vote.test"))
    [(dlq_seq, d)] = await wait_records(bus, 1)
    # The advisory path reads the ce- headers: the record knows the event.
    assert (d.event_id, d.event_type, d.tenant) == (event.id, "vote.test", "acme")
    assert d.headers["ce-id"] == event.id

    await dlq.replay(bus, dlq_seq)
    replayed = await bus.js.get_msg(subjects.EVENTS_STREAM, seq + 1)
    assert envelope.decode(replayed.data, replayed.headers) == event
    # Its publisher's signature still holds: it covers the ce- headers it came with.
    original = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
    assert replayed.headers[subjects.H_SIGNATURE] == original.headers[subjects.H_SIGNATURE]


async def test_replay_and_get_refuse_what_they_cannot(bus: Bus) -> None:
    with pytest.raises(ConfigError, match="no dead letter with id 999"):
        await dlq.replay(bus, 999)
    with pytest.raises(ConfigError):
        await dlq.get(bus, 0)
    not_an_event = DeadLetter(
        reason="malformed", error="x", subject="mesh.decision.acme.x", tenant="acme", body_b64=""
    )
    gone = DeadLetter(reason="terminated", error="x", subject="", tenant="unknown", body_b64="")
    a = await bus.publish(subjects.dlq("acme", "malformed"), encoder.encode(not_an_event))
    b = await bus.publish(subjects.dlq("unknown", "terminated"), encoder.encode(gone))
    with pytest.raises(ConfigError, match="not an events subject") as e:
        await dlq.replay(bus, a.seq)
    assert e.value.hint
    with pytest.raises(ConfigError, match="original message was gone"):
        await dlq.replay(bus, b.seq)
    assert (await dlq.get(bus, a.seq)).subject == "mesh.decision.acme.x"


async def seed(bus: Bus, reasons: list[str]) -> None:
    for i, reason in enumerate(reasons):
        d = DeadLetter(
            reason=reason,  # type: ignore[arg-type]
            error=f"e{i}",
            subject=subjects.event("acme", "vote.test"),
            tenant="acme" if i % 2 else "other",
            body_b64=DeadLetter.encode_body(b"{}"),
        )
        await bus.publish(subjects.dlq(d.tenant, reason), encoder.encode(d))


async def test_latest_filters_by_reason(bus: Bus) -> None:
    await seed(bus, ["terminated", "malformed", "terminated", "max_deliveries", "terminated"])
    got = await records(bus, "terminated")
    assert [d.error for _, d in got] == ["e0", "e2", "e4"]
    assert [d.error for _, d in await dlq.latest(bus, limit=2, reason="terminated")] == [
        "e2",
        "e4",
    ]
    assert await records(bus, "no_agent") == []
    # A foreign message on mesh.dlq.> is skipped, not fatal to the listing.
    await bus.publish(subjects.dlq("acme", "terminated"), b"not a dead letter")
    assert [d.error for _, d in await records(bus, "terminated")] == ["e0", "e2", "e4"]
    assert len(await records(bus)) == 5
    with pytest.raises(ConfigError, match="not a dead-letter reason"):
        await records(bus, "nope.*")


async def test_purge_with_and_without_reason(bus: Bus) -> None:
    await seed(bus, ["terminated", "malformed", "terminated", "max_deliveries"])
    assert await dlq.purge(bus, reason="terminated") == 2
    assert sorted(d.reason for _, d in await records(bus)) == ["malformed", "max_deliveries"]
    assert await dlq.purge(bus, reason="terminated") == 0
    with pytest.raises(ConfigError):
        await dlq.purge(bus, reason=">")
    assert await dlq.purge(bus, reason=None) == 2
    assert await records(bus) == []


# -- the CLI ----------------------------------------------------------------------------------
@pytest.fixture
def cli_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A server for the CLI (sync: the commands run their own event loop with asyncio.run)."""
    with EmbeddedServer() as server:
        monkeypatch.setenv("MESH_NATS_URL", server.url)
        get_settings.cache_clear()
        try:
            yield server.url
        finally:
            get_settings.cache_clear()


async def _dead_letter_one(url: str) -> tuple[str, int]:
    async with await Bus.connect(url, name="seed") as bus:
        await bus.ensure()
        async with AdvisoryDeadLetters(bus):
            event, _ = await publish(bus, "vote.cli", {"a": [1, 2]})
            await terminate(bus, "termer", subjects.event("acme", "vote.cli"))
            [(dlq_seq, _)] = await wait_records(bus, 1)
    return event.id, dlq_seq


async def _events_with_id(url: str, msg_id: str) -> int:
    async with await Bus.connect(url, name="check") as bus:
        info = await bus.js.stream_info(subjects.EVENTS_STREAM)
        found = 0
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            raw = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
            found += (raw.headers or {}).get(subjects.H_MSG_ID) == msg_id
        return found


def test_cli_dlq_commands(cli_server: str) -> None:
    event_id, dlq_seq = asyncio.run(_dead_letter_one(cli_server))
    runner = CliRunner()

    r = runner.invoke(app, ["dlq", "ls", "--json"])
    assert r.exit_code == 0, r.output
    [row] = json.loads(r.stdout)
    assert row["seq"] == dlq_seq and row["reason"] == "terminated"
    assert row["event_id"] == event_id

    r = runner.invoke(app, ["dlq", "ls", "--json", "--reason", "malformed"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout) == []

    r = runner.invoke(app, ["dlq"])  # the bare group lists too
    assert r.exit_code == 0, r.output
    assert "terminated" in r.stdout

    r = runner.invoke(app, ["dlq", "show", str(dlq_seq)])
    assert r.exit_code == 0, r.output
    for text in ("terminated", "'termer'", event_id, "vote.cli", "acme", TRACE_ID):
        assert text in r.stdout
    assert "publisher" in r.stdout  # the verified publisher, or why there is none
    body = json.loads(r.stdout[r.stdout.index("bytes)") + len("bytes)") :])
    assert body["data"] == {"a": [1, 2]}  # pretty-printed JSON parses back

    r = runner.invoke(app, ["dlq", "show", str(dlq_seq), "--json"])
    shown = json.loads(r.stdout)
    assert shown["publisher"] or shown["publisher_unverified"]
    assert (
        msgspec.convert(
            {k: v for k, v in json.loads(r.stdout).items() if k != "seq"}, DeadLetter
        ).event_id
        == event_id
    )

    r = runner.invoke(app, ["dlq", "show", "999999"])
    assert r.exit_code == 4
    assert "no dead letter with id 999999" in r.output
    assert "Traceback" not in r.output

    r = runner.invoke(app, ["dlq", "replay", str(dlq_seq)])
    assert r.exit_code == 0, r.output
    msg_id = r.stdout.strip()
    assert msg_id.startswith(f"replay:{dlq_seq}:")
    assert "the coordinator will decide it if it never was" in r.stderr
    assert asyncio.run(_events_with_id(cli_server, msg_id)) == 1

    r = runner.invoke(app, ["dlq", "replay", "999999"])
    assert r.exit_code == 4 and "Traceback" not in r.output

    r = runner.invoke(app, ["dlq", "purge"])
    assert r.exit_code == 3
    assert "--yes" in r.output

    r = runner.invoke(app, ["dlq", "purge", "--reason", "bogus", "--yes"])
    assert r.exit_code == 3 and "not a dead-letter reason" in r.output

    r = runner.invoke(app, ["dlq", "purge", "--yes"])
    assert r.exit_code == 0, r.output
    assert "removed 1 dead letter(s)" in r.stdout

    r = runner.invoke(app, ["dlq", "ls", "--json"])
    assert json.loads(r.stdout) == []


# -- bodies too large for a record ------------------------------------------------------------
async def _large_dead_letter(url: str, body: bytes) -> tuple[int, DeadLetter]:
    async with await Bus.connect(url, name="seed") as bus:
        await bus.ensure()
        async with AdvisoryDeadLetters(bus):
            subject = subjects.event("acme", "raw.big")
            await bus.publish(subject, body, msg_id="big-1")
            await terminate(bus, "termer", subject)
            [(dlq_seq, d)] = await wait_records(bus, 1)
    return dlq_seq, d


async def _replayed_body(url: str, dlq_seq: int) -> bytes:
    async with await Bus.connect(url, name="replay") as bus:
        await dlq.replay(bus, dlq_seq)
        last = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
        return (await bus.js.get_msg(subjects.EVENTS_STREAM, last)).data or b""


async def _tamper(url: str, ref_name: str) -> None:
    async with await Bus.connect(url, name="tamper") as bus:  # the operator may; nobody else
        store = await bus.js.object_store(subjects.DLQ_BODIES_BUCKET)
        await store.put(ref_name, b"not what was received")


def test_a_body_too_large_for_its_record_is_kept_by_reference(cli_server: str) -> None:
    """The advisory path: a ~900 KB body (base64 would pass max_payload) is kept in the object
    store with its hash; show says where, replay republishes it whole, tampering is refused."""
    body = bytes(range(256)) * 3500  # 896,000 bytes, not UTF-8, not JSON
    dlq_seq, d = asyncio.run(_large_dead_letter(cli_server, body))
    assert d.body_ref is not None and d.body_b64 == ""
    assert d.body_ref.size == len(body)
    assert d.body_ref.sha256 == hashlib.sha256(body).hexdigest()
    assert d.body_ref.bucket == subjects.DLQ_BODIES_BUCKET

    runner = CliRunner()
    r = runner.invoke(app, ["dlq", "show", str(dlq_seq)])
    assert r.exit_code == 0, r.output
    assert "by reference" in r.stdout and d.body_ref.sha256 in r.stdout
    assert f"({len(body)} bytes)" in r.stdout
    r = runner.invoke(app, ["dlq", "ls"])
    assert r.exit_code == 0 and "kept by reference" in r.stdout, r.output

    assert asyncio.run(_replayed_body(cli_server, dlq_seq)) == body

    asyncio.run(_tamper(cli_server, d.body_ref.name))
    r = runner.invoke(app, ["dlq", "show", str(dlq_seq)])
    assert "does not match" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["dlq", "replay", str(dlq_seq)])
    assert r.exit_code == 3 and "does not match" in r.output, r.output


async def test_an_event_the_coordinator_dead_lettered_keeps_its_one_record(
    bus: Bus, adl: AdvisoryDeadLetters
) -> None:
    """The coordinator marked the event (its last delivery) and crashed before storing its
    record: JetStream's give-up advisory stores the coordinator's record, under the
    coordinator's message id, not a second `max_deliveries` one."""
    from coordinator.ledger import Ledger, state_key

    event, seq = await publish(bus)
    ledger = await Ledger.on_bus(bus, "crashed-coordinator", 2.0)
    await ledger.mark_dead_lettered(
        state_key("acme", event.id), stream_seq=seq, reason="no_agent", error="nobody has s9"
    )
    advisory = json.dumps(
        {
            "type": "io.nats.jetstream.advisory.v1.max_deliver",
            "stream": subjects.EVENTS_STREAM,
            "consumer": subjects.COORDINATOR_DURABLE,
            "stream_seq": seq,
            "deliveries": 20,
        }
    ).encode()
    subject = subjects.max_deliveries_advisory(subjects.EVENTS_STREAM, subjects.COORDINATOR_DURABLE)
    await adl.handle(subject, advisory)
    # Again (as would be the coordinator's own late publish, same message id): deduplicated.
    await adl.handle(subject, advisory)
    got = await records(bus)
    assert [(d.reason, d.error, d.event_id) for _, d in got] == [
        ("no_agent", "nobody has s9", event.id)
    ]
    assert adl.stats.recorded == 1 and adl.stats.duplicates == 1
