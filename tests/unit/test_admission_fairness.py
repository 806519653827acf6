"""Admission is fair between tenants (issue 16, noisy neighbour): a flooding tenant's backlog
does not stand in front of another tenant's event, a lone tenant still uses every slot, and a
held event is kept in progress, never nak'ed or lost. Time is a ManualClock: no sleeps."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from coordinator.admission import Admission
from coordinator.clock import ManualClock, settle
from mesh._internal.consume import PullLoop

FLOOD, STEADY = "flood", "steady"


class Log:
    """Who was admitted, in order, and when (on the manual clock)."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.order: list[str] = []
        self.at: dict[str, float] = {}

    def admitted(self, name: str) -> None:
        self.order.append(name)
        self.at[name] = self.clock.monotonic()


async def _event(
    adm: Admission, log: Log, name: str, tenant: str, work_s: float, *agents: str
) -> None:
    """One event: wait for room, then hold it while its calls take `work_s`."""
    async with adm.slots(agents or ["a"], tenant=tenant):
        log.admitted(name)
        await adm.clock.sleep(work_s)


async def test_a_steady_tenant_goes_ahead_of_a_floods_backlog() -> None:
    clock = ManualClock()
    adm = Admission(lambda agent: 2, clock=clock)
    log = Log(clock)
    # Twenty slow events of the flooding tenant at once: 2 s each, 2 at a time (20 s to drain).
    flood = [asyncio.create_task(_event(adm, log, f"f{i}", FLOOD, 2.0)) for i in range(20)]
    await settle()
    assert adm.held["a"] == 2 and adm.waiting == 18
    await clock.advance(0.5)
    steady = asyncio.create_task(_event(adm, log, "s0", STEADY, 0.01))
    await settle()
    assert not steady.done()  # no slot is taken back from a running call
    await clock.advance(1.5)  # the first flood calls end at t = 2
    # The steady event took the first slot given back, ahead of 18 flood events that waited
    # longer; the other slot went to the flood (nobody else waited for it).
    assert log.order[:4] == ["f0", "f1", "s0", "f2"] or log.order[:4] == ["f0", "f1", "f2", "s0"]
    assert log.at["s0"] == 2.0
    await clock.advance(0.01)
    assert steady.done()
    await clock.advance(30)
    await asyncio.gather(*flood)
    assert len(log.order) == 21 and adm.held["a"] == 0 and not adm.tenant_held


async def test_the_old_arrival_order_would_have_kept_it_behind_the_whole_backlog() -> None:
    """The same flood, both events of one tenant: then arrival order is all there is, and the
    late event waits for the backlog (what every tenant got before fairness)."""
    clock = ManualClock()
    adm = Admission(lambda agent: 2, clock=clock)
    log = Log(clock)
    tasks = [asyncio.create_task(_event(adm, log, f"f{i}", FLOOD, 2.0)) for i in range(20)]
    await settle()
    await clock.advance(0.5)
    tasks.append(asyncio.create_task(_event(adm, log, "s0", FLOOD, 0.01)))
    await clock.advance(30)
    await asyncio.gather(*tasks)
    assert log.order[-1] == "s0" and log.at["s0"] == 20.0


async def test_two_backlogged_tenants_take_turns() -> None:
    clock = ManualClock()
    adm = Admission(lambda agent: 1, clock=clock)
    log = Log(clock)
    tasks = [asyncio.create_task(_event(adm, log, f"f{i}", FLOOD, 1.0)) for i in range(6)]
    await settle()
    tasks += [asyncio.create_task(_event(adm, log, f"s{i}", STEADY, 1.0)) for i in range(3)]
    await clock.advance(20)
    await asyncio.gather(*tasks)
    # The flood was first and alone at first; then each slot given back goes to the tenant
    # holding fewer (none, while the other holds the slot): turns, until steady has no more.
    assert log.order == ["f0", "s0", "f1", "s1", "f2", "s2", "f3", "f4", "f5"]


async def test_a_lone_tenant_uses_every_slot() -> None:
    clock = ManualClock()
    adm = Admission(lambda agent: 4, clock=clock)
    log = Log(clock)
    tasks = [asyncio.create_task(_event(adm, log, f"f{i}", FLOOD, 1.0)) for i in range(10)]
    await settle()
    assert adm.held["a"] == 4 and adm.tenant_held[FLOOD]["a"] == 4  # no share kept back
    await clock.advance(3.0)
    await asyncio.gather(*tasks)
    assert log.at == {f"f{i}": float(i // 4) for i in range(10)}  # 4 at a time, all along
    assert adm.held["a"] == 0 and not adm.tenant_held  # a tenant holding nothing is forgotten


async def test_a_tenant_that_waits_for_nothing_more_keeps_no_share() -> None:
    """Another tenant holding a slot, but waiting for no more, does not keep the flood from the
    rest: idle shares are lent."""
    clock = ManualClock()
    adm = Admission(lambda agent: 4, clock=clock)
    log = Log(clock)
    steady = asyncio.create_task(_event(adm, log, "s0", STEADY, 5.0))
    await settle()
    tasks = [asyncio.create_task(_event(adm, log, f"f{i}", FLOOD, 1.0)) for i in range(6)]
    await settle()
    assert adm.tenant_held == {STEADY: {"a": 1}, FLOOD: {"a": 3}}
    await clock.advance(2.0)
    await asyncio.gather(*tasks)
    assert adm.tenant_held == {STEADY: {"a": 1}}
    await clock.advance(3.0)
    await steady
    assert not adm.tenant_held


async def test_fairness_keeps_all_or_nothing() -> None:
    """A tenant whose turn it is but whose event does not fit yet does not block the others:
    room it cannot use goes on to whoever fits (no slot is kept idle)."""
    clock = ManualClock()
    adm = Admission({"a": 1, "b": 1}.__getitem__, clock=clock)
    log = Log(clock)
    b_holder = asyncio.create_task(_event(adm, log, "fb", FLOOD, 10.0, "b"))
    a_holder = asyncio.create_task(_event(adm, log, "fa", FLOOD, 1.0, "a"))
    await settle()
    steady = asyncio.create_task(_event(adm, log, "s-ab", STEADY, 0.1, "a", "b"))
    flood = asyncio.create_task(_event(adm, log, "f-a", FLOOD, 0.1, "a"))
    await clock.advance(1.0)  # "a" comes back: steady needs "b" too, so the flood gets "a"
    assert log.order == ["fb", "fa", "f-a"]
    await clock.advance(10.0)
    await asyncio.gather(b_holder, a_holder, steady, flood)
    assert log.order[-1] == "s-ab" and adm.held == {"a": 0, "b": 0}


@dataclass(eq=False)
class FakeMsg:
    """A JetStream message as the consume loop and admission see it: it counts its fate."""

    name: str
    tenant: str
    work_s: float
    acks: int = 0
    naks: int = 0
    kept: int = 0  # +WPI sent

    async def ack(self) -> None:
        self.acks += 1

    async def nak(self) -> None:
        self.naks += 1

    async def in_progress(self) -> None:
        self.kept += 1


async def test_held_messages_are_kept_in_progress_never_naked_or_lost() -> None:
    """The coordinator's wiring in small: the consume loop starts each fetched message, which
    waits for room (kept in progress meanwhile), is worked, then acked."""
    clock = ManualClock()
    adm = Admission(lambda agent: 2, clock=clock, keepalive_s=1.0, stall_s=1000.0)
    msgs = [FakeMsg(f"f{i}", FLOOD, 3.0) for i in range(12)]
    msgs += [FakeMsg(f"s{i}", STEADY, 0.1) for i in range(3)]
    queue = list(msgs)
    log = Log(clock)

    async def fetch(batch: int, timeout: float) -> list[FakeMsg]:
        if not queue:
            await asyncio.sleep(timeout)  # real time: a short pull that finds nothing
            raise TimeoutError
        out = queue[:batch]
        del queue[:batch]
        return out

    async def handle(msg: FakeMsg) -> None:
        async with adm.slots(["a"], tenant=msg.tenant, keepalive=msg.in_progress):
            log.admitted(msg.name)
            await clock.sleep(msg.work_s)
        await msg.ack()

    loop: PullLoop[FakeMsg] = PullLoop(
        fetch, handle, concurrency=64, name="test", drain_s=1.0, fetch_timeout_s=0.01
    )
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    async with asyncio.timeout(10):  # a bound on real time, not a measurement
        while adm.waiting < 13:
            await asyncio.sleep(0.001)
    # 13 wait (10 flood, 3 steady, all fetched: nothing left in the "stream"), 2 flood work.
    await clock.advance(60.0)
    steady_at = sorted(log.at[m.name] for m in msgs if m.tenant == STEADY)
    # Ahead of the 10 flood events that came first: one of the two slots given back at 3.0
    # (the flood, holding none, gets the other), then the next as each ends.
    assert steady_at == [3.0, 3.1, 3.2]
    async with asyncio.timeout(10):
        while loop.inflight:
            await asyncio.sleep(0.001)
    stop.set()
    assert await running == set()
    assert all(m.acks == 1 for m in msgs), [(m.name, m.acks) for m in msgs]
    assert not any(m.naks for m in msgs)
    # Every message that waited was kept in progress about once a second while it waited.
    last = max(msgs, key=lambda m: log.at[m.name])
    assert last.tenant == FLOOD and last.kept >= int(log.at[last.name]) - 1 >= 10
    assert all(m.kept >= int(log.at[m.name]) - 1 for m in msgs)
