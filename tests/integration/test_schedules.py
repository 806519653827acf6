"""Schedules on a real nats-server (message scheduling, ADR-51): the server fires, relays turn
firings into signed events with one id per firing.

- two agent replicas declaring the same schedule leave one definition, and each period fires
  once: as many events as firings, every id distinct (a relay that kept the definition's id
  would see firing 2 dropped as a duplicate of firing 1);
- a schedule declared before a server restart fires after it (the stream holds it);
- a follow-up is idempotent by id; removing a schedule stops it.
Periods are `@every 1s`; every wait is bounded; nothing asserts a timing."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

from mesh import envelope, schedules, subjects
from mesh.bus import Bus, StreamMessage, read_stream
from mesh.identity import IdentityDir, load_trust
from mesh.records import event_principal
from mesh.server import EmbeddedServer
from mesh.settings import Settings
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

TENANT = "acme"
SWEEP = "compliance.sweep"
ROOT = Path(__file__).resolve().parents[2]


async def _firings(bus: Bus, name: str) -> list[StreamMessage]:
    return await read_stream(
        bus, subjects.SCHEDULES_STREAM, filter_subject=subjects.schedule_fire(TENANT, name)
    )


async def _events(bus: Bus, event_type: str = SWEEP) -> list[StreamMessage]:
    return await read_stream(
        bus, subjects.EVENTS_STREAM, filter_subject=subjects.event(TENANT, event_type)
    )


def _at_least(n: int, get: Callable[[], object]) -> Callable[[], object]:
    async def check() -> object:
        got = await get()  # type: ignore[misc]
        return got if len(got) >= n else None

    return check


async def test_two_replicas_make_one_schedule_that_fires_once_per_period(
    nats_server: EmbeddedServer, bus: Bus, identities: IdentityDir
) -> None:
    agent_file = identities.issue("agent", "sweeper")
    nats_server.reload()
    replica = Settings(nats_url=nats_server.url, identity=agent_file)
    sweep = schedules.schedule("sweep", SWEEP, {"scope": "all"}, tenant=TENANT, every="1s")
    async with (
        await Bus.connect(nats_server.url, settings=replica) as one,
        await Bus.connect(nats_server.url, settings=replica) as two,
    ):
        # Both replicas declare it at start, at the same moment, twice over.
        declared = await asyncio.gather(
            *(schedules.declare(b, sweep) for b in (one, two, one, two))
        )
        assert len({d.seq for d in declared}) == 1
        definitions = await read_stream(
            bus,
            subjects.SCHEDULES_STREAM,
            filter_subject=subjects.schedule_def(TENANT, "sweep"),
        )
        assert len(definitions) == 1
        assert [d.schedule for d in await schedules.listing(one, TENANT)] == [sweep]

        async with schedules.relaying(one), schedules.relaying(two):
            await eventually(
                _at_least(4, lambda: _events(bus)), "four sweeps published", timeout=20
            )
            assert await schedules.remove(one, TENANT, "sweep")
            await eventually(lambda: _pending_zero(bus), "every firing relayed", timeout=15)
        firings = await _firings(bus, "sweep")
        events = await _events(bus)

    # One firing per period: no two carry the same "next" time (a second definition, or a
    # replica firing on its own clock, would repeat periods).
    nexts = [f.headers[subjects.H_SCHEDULE_NEXT] for f in firings]
    assert len(set(nexts)) == len(nexts)
    # One event per firing, each with its own id, the one derived from its firing.
    assert len(events) == len(firings) >= 4
    decoded = [envelope.decode(e.data, e.headers) for e in events]
    assert len({e.id for e in decoded}) == len(decoded)
    sched = schedules.decode(firings[0].data)
    stored = [await bus.js.get_msg(subjects.SCHEDULES_STREAM, f.seq) for f in firings]
    assert {e.id for e in decoded} == {
        schedules.firing_event(sched, seq=int(m.seq or 0), stored=m.time).id  # type: ignore[arg-type]
        for m in stored
    }
    assert all(e.source == f"mesh://schedule/{TENANT}/sweep" for e in decoded)
    assert all(e.data == {"scope": "all"} for e in decoded)
    # Signed by the relay that published it: a trusted agent key, as the coordinator checks.
    trust = load_trust(identities.trust_path)
    for e in events:
        principal, why = event_principal(
            trust,
            e.subject,
            envelope.signed_content(e.headers, e.data),
            e.headers.get(subjects.H_SIGNATURE),
        )
        assert principal == "agent:sweeper", why


async def _pending_zero(bus: Bus) -> bool:
    return await schedules.pending_firings(bus) == 0


async def test_a_schedule_declared_before_a_server_restart_fires_after_it(
    tmp_path: Path,
) -> None:
    store = tmp_path / "js"
    sweep = schedules.schedule("nightly", SWEEP, {"n": 1}, tenant=TENANT, every="1s")
    server = EmbeddedServer(store).start()
    try:
        async with await Bus.connect(server.url) as bus:
            await bus.ensure()
            await schedules.declare(bus, sweep)
            before = await eventually(
                _at_least(1, lambda: _firings(bus, "nightly")), "a first firing", timeout=15
            )
            last_before = max(f.seq for f in before)  # type: ignore[attr-defined]
    finally:
        server.stop()
    server = EmbeddedServer(store).start()  # same store: the stream and its schedule survive
    try:
        async with await Bus.connect(server.url) as bus:
            after = await eventually(
                lambda: _fired_after(bus, last_before), "a firing after the restart", timeout=15
            )
            assert after
            assert [d.schedule for d in await schedules.listing(bus)] == [sweep]
            async with schedules.relaying(bus):
                await eventually(
                    _at_least(2, lambda: _events(bus)), "events from before and after", timeout=15
                )
    finally:
        server.stop()


async def _fired_after(bus: Bus, seq: int) -> list[StreamMessage]:
    return [f for f in await _firings(bus, "nightly") if f.seq > seq]


async def test_a_follow_up_is_idempotent_by_id_and_removal_stops_a_schedule(bus: Bus) -> None:
    declared = [
        await schedules.follow_up(
            bus,
            "recheck-42",
            "release.recheck",
            {"release": "r-42"},
            at=timedelta(seconds=1),
            tenant=TENANT,
        )
        for _ in range(2)
    ]
    assert declared[0].schedule.name == declared[1].schedule.name
    doomed = schedules.schedule("doomed", SWEEP, tenant=TENANT, every="1s")
    await schedules.declare(bus, doomed)
    assert await schedules.remove(bus, TENANT, "doomed")
    assert not await schedules.remove(bus, TENANT, "doomed")  # already gone
    removed_at = max(m.seq for m in await read_stream(bus, subjects.SCHEDULES_STREAM))
    probe = schedules.schedule("probe", "probe.tick", tenant=TENANT, every="1s")
    await schedules.declare(bus, probe)
    async with schedules.relaying(bus):
        got = await eventually(
            _at_least(1, lambda: _events(bus, "release.recheck")), "the follow-up", timeout=15
        )
        await eventually(_at_least(2, lambda: _firings(bus, "probe")), "two probe firings")
    # The follow-up fired once, with the id it was declared with; it is no longer listed.
    assert [envelope.decode(m.data, m.headers).id for m in got] == ["recheck-42"]  # type: ignore[attr-defined]
    names = {d.schedule.name for d in await schedules.listing(bus, TENANT)}
    assert names == {"probe"}
    # While the probe fired twice, the removed schedule fired never.
    assert not [f for f in await _firings(bus, "doomed") if f.seq > removed_at]
    # Declaring the same follow-up again after it fired publishes nothing new.
    await schedules.follow_up(
        bus,
        "recheck-42",
        "release.recheck",
        {"release": "r-42"},
        at=timedelta(seconds=0),
        tenant=TENANT,
    )
    async with schedules.relaying(bus):
        await eventually(lambda: _pending_zero(bus), "the repeat relayed", timeout=15)
    assert len(await _events(bus, "release.recheck")) == 1


async def test_a_publisher_may_not_declare_schedules(
    nats_server: EmbeddedServer, bus: Bus, identities: IdentityDir
) -> None:
    from mesh.bus import PermissionDeniedError

    publisher = identities.issue("publisher", "sched-pub", tenant=TENANT)
    nats_server.reload()
    settings = Settings(nats_url=nats_server.url, identity=publisher)
    async with await Bus.connect(nats_server.url, settings=settings) as pub:
        with pytest.raises((PermissionDeniedError, Exception)):
            await schedules.declare(
                pub, schedules.schedule("sneaky", SWEEP, tenant=TENANT, every="1s")
            )
    assert await schedules.listing(bus) == []


async def test_an_agent_may_declare_but_not_forge_a_firing(
    nats_server: EmbeddedServer, bus: Bus, identities: IdentityDir
) -> None:
    """Only the server writes firings: an agent that could would have a relay sign anything."""
    from mesh.bus import PermissionDeniedError

    agent_file = identities.issue("agent", "forger")
    nats_server.reload()
    settings = Settings(nats_url=nats_server.url, identity=agent_file)
    sched = schedules.schedule("real", SWEEP, tenant=TENANT, cron="0 0 2 * * *")
    async with await Bus.connect(nats_server.url, settings=settings) as agent:
        await schedules.declare(agent, sched)
        with pytest.raises(PermissionDeniedError):
            await agent.publish(subjects.schedule_fire(TENANT, "real"), schedules.encode(sched))
    assert await _firings(bus, "real") == []


async def test_mesh_schedules_add_ls_rm(nats_server: EmbeddedServer, bus: Bus) -> None:
    import json
    import os
    import sys

    async def mesh(*args: str) -> tuple[int, str]:
        env = {**os.environ, "MESH_NATS_URL": nats_server.url, "PYTHONPATH": str(ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "from mesh.cli import main; main()", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    code, out = await mesh(
        "schedules", "add", "sweep", SWEEP, '{"scope": "all"}', "--cron", "0 0 2 * * *",
        "--tz", "Europe/Paris", "--tenant", TENANT,
    )  # fmt: skip
    assert code == 0, out
    code, out = await mesh("schedules", "add", "bad", SWEEP, "--cron", "every day")
    assert code == 3, out
    assert "refused the schedule" in out
    code, out = await mesh("schedules", "ls", "--json")
    assert code == 0, out
    doc = json.loads(out[out.index("{") :])
    assert [(s["name"], s["when"], s["time_zone"]) for s in doc["schedules"]] == [
        ("sweep", "0 0 2 * * *", "Europe/Paris")
    ]
    assert doc["pending_firings"] is None  # no relay ever ran
    assert (await mesh("schedules", "rm", "sweep", "--tenant", TENANT))[0] == 0
    assert (await mesh("schedules", "rm", "sweep", "--tenant", TENANT))[0] == 4
    assert await schedules.listing(bus) == []


async def test_the_coordinator_decides_every_firing() -> None:
    """End to end: each firing is its own event to the coordinator's ledger (one decision per
    firing, not one for the schedule)."""
    import json

    from agents.compliance_review.agent import agent as compliance
    from agents.quality_review.agent import agent as quality
    from agents.security_review.agent import agent as security
    from coordinator.policy import DEFAULT_FILE
    from mesh.testing import MeshHarness

    release = json.loads((ROOT / "agents" / "samples" / "release_clean.json").read_text())
    async with MeshHarness(security, compliance, quality, policies=DEFAULT_FILE) as mesh:
        review = schedules.schedule(
            "weekly-review", "release.proposed", release, tenant=TENANT, every="1s"
        )
        await schedules.declare(mesh.bus, review)
        async with schedules.relaying(mesh.bus):
            events = await eventually(
                _at_least(2, lambda: _events(mesh.bus, "release.proposed")),
                "two scheduled releases",
                timeout=20,
            )
            ids = [envelope.decode(e.data, e.headers).id for e in events[:2]]
            decisions = [await mesh.decision(i, timeout=20) for i in ids]
        await schedules.remove(mesh.bus, TENANT, "weekly-review")
    assert ids[0] != ids[1]
    assert [d.event_id for d in decisions] == ids
    assert [d.outcome for d in decisions] == ["approved", "approved"]
    # Verified as signed by the relay (here the harness's operator connection).
    assert all(d.principal.startswith("operator:") for d in decisions), decisions
