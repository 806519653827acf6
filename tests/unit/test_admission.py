"""Admission (coordinator.admission): all-or-nothing call slots per event, given back whatever
happens, a wait bounded by progress, and AIMD call limits. Time is a ManualClock: no sleeps."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from coordinator import admission
from coordinator.admission import Admission, AimdLimit, Grant
from coordinator.clock import ManualClock, settle


def _admission(caps: dict[str, int], clock: ManualClock, **kw: float) -> Admission:
    return Admission(lambda agent: caps.get(agent, 0), clock=clock, **kw)


@contextlib.asynccontextmanager
async def _holding(adm: Admission, *agents: str) -> AsyncIterator[asyncio.Task[Grant]]:
    """A task that takes slots of `agents` and holds them until cancelled (or `release`)."""
    got: asyncio.Future[Grant] = asyncio.get_running_loop().create_future()
    hold = asyncio.Event()

    async def run() -> Grant:
        async with adm.slots(agents) as grant:
            got.set_result(grant)
            await hold.wait()
            return grant

    task = asyncio.create_task(run())
    try:
        yield task
    finally:
        hold.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_event_takes_every_slot_at_once_or_none() -> None:
    clock = ManualClock()
    adm = _admission({"a": 1, "b": 1}, clock)
    async with _holding(adm, "b") as holder:
        await settle()
        assert adm.held == {"b": 1}
        waiter = asyncio.create_task(_take(adm, "a", "b"))
        await settle()
        # "a" is free, "b" is not: the waiter holds nothing meanwhile, so another event that
        # needs only "a" is not blocked by it.
        assert not waiter.done() and adm.held["a"] == 0 and adm.waiting == 1
        async with adm.slots(["a"]):
            assert adm.held["a"] == 1
        holder.cancel()
        await settle()
        assert waiter.done()
    assert adm.held == {"a": 0, "b": 0}


async def _take(adm: Admission, *agents: str) -> None:
    async with adm.slots(agents):
        await asyncio.sleep(0)


async def test_slots_come_back_on_an_error_and_on_cancel() -> None:
    clock = ManualClock()
    adm = _admission({"a": 2, "b": 2}, clock)
    with pytest.raises(RuntimeError):
        async with adm.slots(["a", "b"]):
            raise RuntimeError("the decision failed")
    assert sum(adm.held.values()) == 0

    async with _holding(adm, "a", "b") as holder:
        await settle()
        assert adm.held == {"a": 1, "b": 1}
        holder.cancel()
        await settle()
    assert sum(adm.held.values()) == 0


async def test_a_cancelled_waiter_leaves_the_queue_and_holds_nothing() -> None:
    clock = ManualClock()
    adm = _admission({"a": 1}, clock)
    async with _holding(adm, "a"):
        await settle()
        waiter = asyncio.create_task(_take(adm, "a"))
        await settle()
        assert adm.waiting == 1
        waiter.cancel()
        await settle()
        assert adm.waiting == 0 and adm.held["a"] == 1
    assert adm.held["a"] == 0


async def test_one_calls_slot_comes_back_when_its_vote_is_in() -> None:
    clock = ManualClock()
    adm = _admission({"a": 1, "b": 1}, clock)
    async with adm.slots(["a", "b"]) as grant:
        admission.release("a")  # what the service's asker does when a vote is in
        admission.release("a")  # twice is once
        assert adm.held == {"a": 0, "b": 1} and grant.held["a"] == 0
    assert adm.held == {"a": 0, "b": 0}
    admission.release("a")  # outside a decision: nothing to give back
    assert adm.held["a"] == 0


async def test_an_agent_named_twice_needs_two_slots_or_an_idle_agent() -> None:
    clock = ManualClock()
    adm = _admission({"a": 1}, clock)
    async with adm.slots(["a", "a"]):  # more than its capacity: goes when "a" is idle
        assert adm.held["a"] == 2
    assert adm.held["a"] == 0


async def test_an_agent_with_nothing_usable_is_not_waited_for() -> None:
    clock = ManualClock()
    caps = {"a": 1, "b": 0}  # "b": every replica's breaker open, or none registered
    adm = _admission(caps, clock)
    async with _holding(adm, "b"):
        await settle()
        async with adm.slots(["a", "b"]):
            assert adm.held == {"a": 1, "b": 2}


async def test_waiters_are_granted_in_arrival_order() -> None:
    clock = ManualClock()
    adm = _admission({"a": 1}, clock)
    order: list[int] = []

    async def one(i: int) -> None:
        async with adm.slots(["a"]):
            order.append(i)
            await asyncio.sleep(0)

    async with _holding(adm, "a") as holder:
        await settle()
        tasks = [asyncio.create_task(one(i)) for i in range(5)]
        await settle()
        holder.cancel()
        await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_waiter_keeps_its_message_alive_and_sees_capacity_grow() -> None:
    clock = ManualClock()
    caps = {"a": 1}
    adm = _admission(caps, clock, keepalive_s=1.0, stall_s=30.0)
    kept = 0

    async def keepalive() -> None:
        nonlocal kept
        kept += 1

    async with _holding(adm, "a"):
        await settle()

        async def wait() -> None:
            async with adm.slots(["a"], keepalive=keepalive):
                pass

        waiter = asyncio.create_task(wait())
        await clock.advance(3.5)
        assert kept == 3 and not waiter.done()
        caps["a"] = 2  # e.g. a replica registered: no slot came back, yet there is room
        await clock.advance(1.0)
        await waiter
    assert adm.held["a"] == 0


async def test_a_wait_ends_only_when_the_agent_gives_nothing_back_for_stall_s() -> None:
    clock = ManualClock()
    adm = _admission({"a": 2}, clock, keepalive_s=1.0, stall_s=10.0)
    async with _holding(adm, "a") as first, _holding(adm, "a"):
        await settle()
        waiter = asyncio.create_task(_take(adm, "a", "a"))  # needs both slots
        await clock.advance(5.0)
        # A slot of "a" comes back (and is taken by a newcomer that fits): that is load, not a
        # wedge, so the stall clock starts again.
        first.cancel()
        async with _holding(adm, "a"):
            await settle()
            assert adm.held["a"] == 2
            await clock.advance(9.0)
            assert not waiter.done()
            await clock.advance(2.0)
            await settle()
            assert waiter.done() and waiter.exception() is None  # went ahead, logged
    assert adm.held["a"] == 0


def test_aimd_starts_at_the_declared_capacity_and_stays_within_bounds() -> None:
    lim = AimdLimit(8)
    assert lim.current == 8
    lim.fast()
    assert lim.current == 8  # never above what the replica declared
    assert lim.overloaded(started=1.0, now=2.0) and lim.current == 4
    # Calls that started before that decrease saw the old limit: one episode, one decrease.
    assert not lim.overloaded(started=1.5, now=2.1) and lim.current == 4
    for t in range(10):
        lim.overloaded(started=3.0 + t, now=3.0 + t)
    assert lim.current == 1  # never below one
    for _ in range(100):
        lim.fast()
    assert lim.current == 8
    lim.declare(2)
    assert lim.current == 2
    assert AimdLimit(0).current == 1


def test_a_redelivery_waits_only_for_the_voters_it_will_still_ask() -> None:
    from coordinator.ledger import DecisionState
    from mesh.records import Vote

    agents = {"s1": "a1", "s2": "a2"}
    now = 1000.0

    def state(kind: str, **kw: object) -> DecisionState:
        base: dict[str, object] = {"lease_until": now - 1, "deadline_at": now + 5, "stream_seq": 7}
        return DecisionState(kind, "c1", **{**base, **kw})  # type: ignore[arg-type]

    left = admission.voters_left
    assert left(None, agents, stream_seq=7, now=now) == ["a1", "a2"]
    assert left(state("decided"), agents, stream_seq=7, now=now) == []
    assert left(state("dead_lettered"), agents, stream_seq=7, now=now) == []
    assert left(state("dead_lettered"), agents, stream_seq=8, now=now) == ["a1", "a2"]  # replay
    assert left(state("collecting", lease_until=now + 1), agents, stream_seq=7, now=now) == []
    voted = {"s1": Vote(skill="s1", agent="a1", outcome="voted")}
    # A take-over (the owner's lease lapsed): only voters without a vote are asked.
    assert left(state("collecting", votes=voted), agents, stream_seq=7, now=now) == ["a2"]
