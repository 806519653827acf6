import pytest
from nats.js.api import StreamConfig

from mesh import envelope, subjects
from mesh.bus import Bus, resolve_servers
from mesh.errors import NotConnectedError, StreamConflictError
from mesh.server import EmbeddedServer
from mesh.settings import Settings

pytestmark = pytest.mark.integration


async def test_ensure_is_idempotent(bus: Bus) -> None:
    await bus.ensure()
    await bus.ensure()
    names = {s.config.name for s in await bus.js.streams_info()}
    assert {subjects.EVENTS_STREAM, subjects.DECISIONS_STREAM, subjects.DLQ_STREAM} <= names


async def test_conflicting_stream_is_a_clear_error(
    nats_server: EmbeddedServer, settings: Settings
) -> None:
    async with await Bus.connect(nats_server.url, settings=settings) as b:
        await b.js.add_stream(StreamConfig(name=subjects.EVENTS_STREAM, subjects=["other.>"]))
        with pytest.raises(StreamConflictError) as err:
            await b.ensure()
    assert "subjects" in str(err.value) and "nats stream rm" in str(err.value)


async def test_republished_event_is_deduplicated(bus: Bus) -> None:
    e = envelope.new_event("release.proposed", {"id": "r"}, event_id="same-id")
    first = await bus.publish_event(e)
    again = await bus.publish_event(e)
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq


async def test_same_id_in_two_tenants_is_two_events(bus: Bus) -> None:
    a = await bus.publish_event(envelope.new_event("t.x", {}, event_id="1", tenant="a"))
    b = await bus.publish_event(envelope.new_event("t.x", {}, event_id="1", tenant="b"))
    assert not b.duplicate and a.seq != b.seq


def test_no_server_configured_says_what_to_do(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("MESH_NATS_URL", raising=False)
    with pytest.raises(NotConnectedError) as err:
        resolve_servers(Settings(home=tmp_path))
    assert "mesh up" in str(err.value)


def test_mesh_nats_url_wins(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    s = Settings(nats_url="nats://127.0.0.1:1, nats://127.0.0.1:2")
    assert resolve_servers(s) == ["nats://127.0.0.1:1", "nats://127.0.0.1:2"]


async def test_unreachable_server_is_a_clear_error() -> None:
    from mesh.server import free_port

    with pytest.raises(NotConnectedError, match="cannot connect"):
        await Bus.connect(f"nats://127.0.0.1:{free_port()}", connect_timeout_s=1)


async def test_tail_reads_the_last_messages_of_a_filter(bus: Bus) -> None:
    """Through filtered consumers (what a reader may use): the last `limit` of one subject
    filter, oldest first, found without reading the rest."""
    from mesh.bus import read_stream, tail

    for i in range(30):
        tenant = "a" if i % 3 else "b"  # b: 0, 3, 6, ... 27 → ten messages
        await bus.publish(subjects.decision(tenant, "t", f"e{i}"), str(i).encode())
    rows = await tail(bus, subjects.DECISIONS_STREAM, 4, filter_subject="mesh.decision.b.>")
    assert [body for _, _, body in rows] == [b"18", b"21", b"24", b"27"]
    assert [seq for seq, _, _ in rows] == sorted(seq for seq, _, _ in rows)
    everything = await tail(bus, subjects.DECISIONS_STREAM, 100)
    assert len(everything) == 30
    assert [body for _, _, body in await tail(bus, subjects.DECISIONS_STREAM, 1)] == [b"29"]
    assert await tail(bus, subjects.DECISIONS_STREAM, 5, filter_subject="mesh.decision.z.>") == []
    assert await tail(bus, "NO_SUCH_STREAM", 5) == []
    b = await read_stream(bus, subjects.DECISIONS_STREAM, filter_subject="mesh.decision.b.>")
    assert [m.data for m in b] == [str(i).encode() for i in range(0, 30, 3)]
    later = await read_stream(bus, subjects.DECISIONS_STREAM, start_seq=b[-1].seq)
    assert [m.data for m in later] == [b"27", b"28", b"29"]


async def test_kv_keys_lists_a_bucket_without_a_consumer(bus: Bus) -> None:
    """`Bus.kv_keys` asks the stream itself: nats-py's `KeyValue.keys()` made an ephemeral
    consumer per listing that the server kept for minutes."""
    kv = await bus.kv(subjects.CANARIES_BUCKET)
    stream = subjects.kv_stream(subjects.CANARIES_BUCKET)
    assert await bus.kv_keys(subjects.CANARIES_BUCKET) == []
    await kv.put("b.2", b"x")
    await kv.put("a.1", b"y")
    await kv.put("a.1", b"z")
    await kv.delete("c")  # a marker only: still a subject of the stream
    consumers = (await bus.js.stream_info(stream)).state.consumer_count
    assert await bus.kv_keys(subjects.CANARIES_BUCKET) == ["a.1", "b.2", "c"]
    assert (await bus.js.stream_info(stream)).state.consumer_count == consumers
