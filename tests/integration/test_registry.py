import asyncio
from pathlib import Path

import pytest

from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.registry import Registry, RegistryView
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.samples import write_card
from tests.support.waits import eventually

pytestmark = pytest.mark.integration


def _card(tmp_path: Path, name: str, skill: str):  # type: ignore[no-untyped-def]
    return with_interfaces(
        load_card(write_card(tmp_path, name, skill)), http_url=None, nats_subject=f"mesh.a2a.{name}"
    )


async def test_registered_agent_is_live_and_found_by_skill(bus: Bus, tmp_path: Path) -> None:
    reg = Registry(bus)
    async with (
        reg.registered(_card(tmp_path, "alpha", "s1"), "i1"),
        reg.registered(_card(tmp_path, "beta", "s2"), "i2"),
    ):
        live = await reg.live()
        assert [(r.agent, r.instance) for r in live] == [("alpha", "i1"), ("beta", "i2")]
        assert [r.agent for r in await reg.by_skill("s2")] == ["beta"]
        assert await reg.by_skill("nope") == []
    assert await reg.live() == []  # a clean stop removes the entry at once


async def test_heartbeat_keeps_an_agent_live_past_its_ttl(bus: Bus, tmp_path: Path) -> None:
    reg = Registry(bus)
    async with reg.registered(_card(tmp_path, "alpha", "s1"), "i1"):
        first = (await reg.live())[0].seen_at
        await eventually(lambda: _seen_after(reg, first + reg.ttl_s))
        assert len(await reg.live()) == 1


async def _seen_after(reg: Registry, t: float) -> bool:
    live = await reg.live()
    return bool(live) and live[0].seen_at > t


async def test_agent_that_stops_heartbeating_drops_out_within_ttl(bus: Bus, tmp_path: Path) -> None:
    reg = Registry(bus)
    view = RegistryView(reg)
    await view.start()
    try:
        # Simulate a crash: the heartbeat task dies and nobody deletes the entry.
        cm = reg.registered(_card(tmp_path, "alpha", "s1"), "i1")
        await cm.__aenter__()
        await eventually(lambda: _async(view.agents_with_skill("s1") == ["alpha"]))
        for task in asyncio.all_tasks():
            if task.get_name().startswith("heartbeat:alpha"):
                task.cancel()
        # "Drops out within the TTL" is the promise; the bound adds one beat of slack.
        await eventually(lambda: _empty(reg), timeout=reg.ttl_s + reg.heartbeat_s + 1.0)
        assert view.agents_with_skill("s1") == []
    finally:
        await view.stop()


async def _empty(reg: Registry) -> bool:
    return await reg.live() == []


async def _async(value: bool) -> bool:
    return value


async def test_a_registered_card_is_bound_to_its_instance_and_signed(
    bus: Bus, tmp_path: Path
) -> None:
    reg = Registry(bus)
    view = RegistryView(reg)
    await view.start()
    try:
        async with reg.registered(_card(tmp_path, "alpha", "s1"), "i1") as entry:
            assert entry.card["signatures"]
            await eventually(lambda: _async(view.agents_with_skill("s1") == ["alpha"]))
            binding = view.binding("alpha", "i1")
            assert binding is not None and binding.agent == "alpha" and binding.instance == "i1"
            assert binding.subjects == ["mesh.a2a.alpha"]  # registered without a direct subject
        # Gone from the registry at once, but its key is still known: an answer it gave just
        # before it stopped still verifies.
        await eventually(lambda: _async(view.instances("alpha") == []))
        assert view.binding("alpha", "i1") == binding
    finally:
        await view.stop()


async def test_the_view_keeps_its_entries_through_a_nats_outage_and_resumes(
    settings: Settings, tmp_path: Path
) -> None:
    """NATS goes away (a leader election, a restart): the view keeps what it knew, says it is
    stale, and once NATS is back it follows the registry again (a new watcher if the old one
    died with the server), so an agent registered after the restart is seen."""
    server = EmbeddedServer(tmp_path / "js").start()
    try:
        async with await Bus.connect(server.url, name="view", settings=settings) as bus:
            await bus.ensure()
            reg = Registry(bus)
            view = RegistryView(reg)
            async with reg.registered(_card(tmp_path, "alpha", "s1"), "i1"):
                await view.start()
                try:
                    await eventually(lambda: _async(view.agents_with_skill("s1") == ["alpha"]))
                    assert not view.stale
                    port = int(server.url.rsplit(":", 1)[1])
                    server.stop()
                    # Longer than a card lives without heartbeats: still there, and stale.
                    await eventually(lambda: _async(view.stale_for_s > reg.ttl_s), timeout=30)
                    assert view.agents_with_skill("s1") == ["alpha"]
                    assert [r.instance for r in view.instances("alpha")] == ["i1"]

                    server.port = port
                    await _start_again(server)
                    await eventually(lambda: _async(not view.stale), timeout=30)
                    async with reg.registered(_card(tmp_path, "beta", "s2"), "i2"):
                        await eventually(
                            lambda: _async(view.agents_with_skill("s2") == ["beta"]), timeout=30
                        )
                        # alpha's heartbeats land again too (its entry aged out meanwhile).
                        await eventually(
                            lambda: _async(view.agents_with_skill("s1") == ["alpha"]), timeout=30
                        )
                finally:
                    await view.stop()
    finally:
        server.stop()


async def _start_again(server: EmbeddedServer, attempts: int = 5) -> None:
    """On its old port, which may linger a moment after the stop."""
    for attempt in range(1, attempts + 1):
        try:
            await asyncio.to_thread(server.start)
            return
        except Exception:
            if attempt == attempts:
                raise
            await asyncio.sleep(1.0)


async def test_a_silent_watcher_is_replaced(bus: Bus, tmp_path: Path) -> None:
    """A watcher that hears nothing any more while entries are live (here: its subscription
    gone under it, as an ordered consumer lost in a leader election) is replaced by a fresh one,
    which sees what happened meanwhile."""
    reg = Registry(bus)
    view = RegistryView(reg)
    async with reg.registered(_card(tmp_path, "alpha", "s1"), "i1"):
        await view.start()
        try:
            await eventually(lambda: _async(view.agents_with_skill("s1") == ["alpha"]))
            await view._watcher.stop()  # silently deaf: its iterator never ends
            async with reg.registered(_card(tmp_path, "beta", "s2"), "i2"):
                await eventually(lambda: _async(view.agents_with_skill("s2") == ["beta"]))
            assert view.rewatches >= 1
            await eventually(lambda: _async(view.agents_with_skill("s2") == []))
            assert view.agents_with_skill("s1") == ["alpha"]
        finally:
            await view.stop()
