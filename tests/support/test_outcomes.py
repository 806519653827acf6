"""The outcome reader counts every stored decision and dead letter exactly once, whatever goes
wrong mid-pass (a request that times out, a sequence a leader in transition does not find)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest

from mesh import subjects
from mesh.bus import Bus
from mesh.records import DeadLetter, Decision
from tests.support.outcomes import Outcomes, read_all, settled
from tests.support.samples import release_event
from tests.support.waits import eventually

pytestmark = pytest.mark.integration

EVENTS = 6


def decision(event_id: str) -> Decision:
    return Decision(
        event_id=event_id,
        event_type="release.proposed",
        tenant="default",
        decision_type="release.decided",
        outcome="approved",
        reason="test",
        rule="unanimous",
        votes=[],
        decided_at=time.time(),
        latency_ms=1.0,
    )


async def store(bus: Bus, run: str) -> list[str]:
    """EVENTS decisions and one dead letter, as the coordinator stores them."""
    ids = [f"{run}-{i}" for i in range(EVENTS)]
    for event_id in ids:
        subject = subjects.decision("default", "release.decided", event_id)
        await bus.publish(subject, msgspec.json.encode(decision(event_id)), msg_id=event_id)
    dead = DeadLetter("malformed", "test", "mesh.evt.default.x", "default", "e30=", event_id=run)
    await bus.publish(subjects.dlq("default", "malformed"), msgspec.json.encode(dead))
    return ids


class Flaky:
    """`bus.js` whose get_msg fails once per chosen sequence of MESH_DECISIONS: a timeout, or
    "not found" (what a stream leader in transition answers)."""

    def __init__(self, js: Any, fail: dict[int, Exception]) -> None:
        self.js = js
        self.fail = dict(fail)
        self.asked: list[int] = []

    async def stream_info(self, name: str) -> Any:
        return await self.js.stream_info(name)

    async def get_msg(self, stream_name: str, seq: int) -> Any:
        if stream_name == subjects.DECISIONS_STREAM:
            self.asked.append(seq)
            if seq in self.fail:
                raise self.fail.pop(seq)
        return await self.js.get_msg(stream_name, seq)


def flaky_reader(bus: Bus, fail: dict[int, Exception]) -> tuple[Outcomes, Flaky]:
    flaky = Flaky(bus.js, fail)

    class Reader(Outcomes):
        @property
        def js(self) -> Any:
            return flaky

    return Reader(bus), flaky


async def test_a_pass_that_times_out_midway_counts_nothing_twice(bus: Bus) -> None:
    from nats.errors import TimeoutError as NatsTimeout

    ids = await store(bus, f"t{time.time_ns()}")
    outcomes, flaky = flaky_reader(bus, {4: NatsTimeout()})

    assert not await outcomes.refresh()  # the pass fails at sequence 4, after reading 1-3
    assert outcomes.errors["TimeoutError"] == 1
    assert len(outcomes.decisions) == 3
    assert await outcomes.refresh()  # the next one resumes at 4 and reads to the end
    assert outcomes.decided_ids() == dict.fromkeys(ids, 1)  # 1-3 were not counted again
    assert flaky.asked == [1, 2, 3, 4, 4, 5, 6]  # nor even read again
    assert await outcomes.refresh()  # and a pass with nothing new adds nothing
    assert outcomes.decided_ids() == dict.fromkeys(ids, 1)
    assert len(outcomes.decisions) == EVENTS and len(outcomes.dead) == 1
    assert not outcomes.missing(ids)


async def test_a_sequence_not_found_is_asked_again_not_skipped(bus: Bus) -> None:
    from nats.js.errors import NotFoundError

    ids = await store(bus, f"n{time.time_ns()}")
    outcomes, _ = flaky_reader(bus, {2: NotFoundError()})

    assert await outcomes.refresh()
    assert outcomes.gaps[subjects.DECISIONS_STREAM] == {2}
    assert outcomes.missing(ids) == {ids[1]}
    assert await outcomes.refresh()  # found now: recorded, once
    assert not outcomes.gaps[subjects.DECISIONS_STREAM]
    assert outcomes.decided_ids() == dict.fromkeys(ids, 1)


async def test_reads_cancelled_mid_pass_then_resumed_count_each_message_once(bus: Bus) -> None:
    """A pass cut by its bound (wait_for cancels it between two reads) loses nothing either."""
    ids = await store(bus, f"c{time.time_ns()}")
    gate = asyncio.Event()

    class Slow(Flaky):
        async def get_msg(self, stream_name: str, seq: int) -> Any:
            if stream_name == subjects.DECISIONS_STREAM and seq == 3 and not gate.is_set():
                await gate.wait()  # hangs until the pass is cut
            return await super().get_msg(stream_name, seq)

    slow = Slow(bus.js, {})

    class Reader(Outcomes):
        @property
        def js(self) -> Any:
            return slow

    outcomes = Reader(bus, pass_timeout=0.3)
    assert not await outcomes.refresh()
    assert len(outcomes.decisions) == 2
    gate.set()
    assert await outcomes.refresh()
    assert outcomes.decided_ids() == dict.fromkeys(ids, 1)


async def test_watching_reads_as_soon_as_a_decision_is_stored(bus: Bus) -> None:
    """The subscription wakes the background reader: its poll (every 30 s) is not what finds
    the new decisions (the check below only looks, it never reads)."""
    outcomes = Outcomes(bus)
    async with outcomes.watching(every=30.0):
        await eventually(lambda: outcomes.complete, "the first pass", timeout=10)
        ids = await store(bus, f"w{time.time_ns()}")
        await eventually(
            lambda: not outcomes.missing(ids), "the watcher read them", timeout=10, every=0.01
        )
        assert not await outcomes.wait_all(ids, timeout=1)
    assert outcomes.decided_ids() == dict.fromkeys(ids, 1)
    final = await read_all(bus)
    assert final.decided_ids() == outcomes.decided_ids() and len(final.dead) == 1


async def test_settled_without_a_coordinator_durable_says_what_is_open(bus: Bus) -> None:
    await bus.publish_event(release_event(f"s{time.time_ns()}", {"id": "r1"}))
    assert "no answer" in await settled(bus, timeout=0.3)
