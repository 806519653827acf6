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
