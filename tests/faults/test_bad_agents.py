"""Agents that answer garbage or hang: their votes count as an error or a timeout, and the
coordinator neither crashes nor stops deciding."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.msg import Msg

from mesh.bus import Bus
from mesh.cards import load_card, with_interfaces
from mesh.dev.launcher import Child
from mesh.records import Decision
from mesh.registry import Registry, new_instance_id
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes
from tests.support.waits import all_alive

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

GARBAGE = "garbage"
GARBAGE_SKILL = "fault-garbage-review"
GARBAGE_SUBJECT = "mesh.a2a.garbage"
# What the garbage agent answers, chosen by the last token of the event id.
GARBAGE_KINDS = ("bytes", "scalar", "verdict")


@pytest.fixture
def card_ttl_s() -> float:
    # A SIGSTOPped agent stops heartbeating; it must still look live when the call goes out,
    # so that the call (not the registry) is what fails. Nothing here waits for expiry.
    return 15.0


def garbage_answer(request: bytes) -> bytes:
    req = json.loads(request)
    event_id = req["params"]["message"]["metadata"]["eventId"]
    kind = event_id.rsplit("-", 1)[1]
    if kind == "bytes":
        return b"\x00not json"
    result: Any = 42  # a JSON-RPC response whose result is no SendMessage answer at all
    if kind == "verdict":  # a completed task whose verdict is no vote
        result = {
            "task": {
                "id": "t-1",
                "contextId": "c-1",
                "status": {"state": "TASK_STATE_COMPLETED"},
                "artifacts": [{"parts": [{"data": {"vote": "maybe", "reasons": 7}}]}],
            }
        }
    return json.dumps({"jsonrpc": "2.0", "id": req.get("id"), "result": result}).encode()


@contextlib.asynccontextmanager
async def garbage_agent(bus: Bus, cards: Path) -> AsyncIterator[list[bytes]]:
    """A raw NATS responder in this process, registered with a card that has GARBAGE_SKILL."""
    card = with_interfaces(
        load_card(samples.write_card(cards, GARBAGE, GARBAGE_SKILL)),
        http_url=None,
        nats_subject=GARBAGE_SUBJECT,
    )
    requests: list[bytes] = []

    async def answer(msg: Msg) -> None:
        requests.append(msg.data)
        await msg.respond(garbage_answer(msg.data))

    sub = await bus.nc.subscribe(GARBAGE_SUBJECT, queue=GARBAGE, cb=answer)
    try:
        async with Registry(bus).registered(card, new_instance_id()):
            yield requests
    finally:
        await sub.unsubscribe()


async def decision_of(
    outcomes: Outcomes, event_id: str, coordinator: Child, timeout: float = 30.0
) -> Decision:
    missing = await outcomes.wait_all([event_id], timeout=timeout, alive=all_alive(coordinator))
    assert not missing, f"no outcome for {event_id}"
    assert not outcomes.dead_letters(event_id), outcomes.dead_letters(event_id)
    d = outcomes.decision(event_id)
    assert d is not None
    assert outcomes.decided_ids()[event_id] == 1
    return d


async def test_garbage_answers_and_a_hung_agent_never_crash_the_coordinator(
    bus: Bus, procs: ProcessMesh
) -> None:
    policy = procs.policy(
        {
            "release.proposed": samples.reviewer_policy(
                agent_timeout_s=1.0, deadline_s=3.0, retries=1
            ),
            "fault.garbage": samples.policy(
                ["release-security-review", GARBAGE_SKILL],
                agent_timeout_s=2.0,
                deadline_s=5.0,
                retries=1,
                decision_type="fault.garbage.decided",
            ),
        },
    )
    run = f"bad-{time.time_ns()}"
    outcomes = Outcomes(bus)
    clean = samples.sample("clean")
    async with garbage_agent(bus, procs.cards) as requests, outcomes.watching():
        running = await procs.up(bus, policy, also=[GARBAGE])
        [coordinator] = running.coordinators
        started = time.monotonic()

        # (a) garbage: one event per kind of garbage, each decided before the next goes out.
        garbage_votes = []
        for kind in GARBAGE_KINDS:
            event = samples.release_event(f"{run}-garbage-{kind}", clean, "fault.garbage")
            await bus.publish_event(event)
            d = await decision_of(outcomes, event.id, coordinator)
            votes = {v.skill: v for v in d.votes}
            garbage_votes.append(votes[GARBAGE_SKILL])
            assert votes["release-security-review"].outcome == "voted"
            assert votes[GARBAGE_SKILL].agent == GARBAGE
            assert votes[GARBAGE_SKILL].outcome == "error", (kind, votes[GARBAGE_SKILL])
            assert votes[GARBAGE_SKILL].counted_as == "reject"
            assert d.outcome == "rejected"
            assert coordinator.alive
        assert len(requests) >= len(GARBAGE_KINDS)  # it really was asked

        # (b) a hung agent: the process is stopped, its subscription still there.
        [quality] = running.agents["quality-review"]
        procs.pause(quality)
        hung_id = f"{run}-hung"
        await bus.publish_event(samples.release_event(hung_id, clean))
        d = await decision_of(outcomes, hung_id, coordinator)
        hung_vote = next(v for v in d.votes if v.skill == "release-quality-review")
        assert hung_vote.outcome == "timeout", hung_vote
        assert hung_vote.counted_as == "reject"
        assert d.outcome == "rejected"
        procs.resume(quality)

        # Still alive, and the next ordinary event is decided as usual.
        assert coordinator.alive, procs.log(coordinator)[-2000:]
        normal_id = f"{run}-normal"
        await bus.publish_event(samples.release_event(normal_id, clean))
        normal = await decision_of(outcomes, normal_id, coordinator)
        ids = [f"{run}-garbage-{k}" for k in GARBAGE_KINDS] + [hung_id, normal_id]
        stall = outcomes.max_stall(ids, started)
        await outcomes.refresh()
    tally = outcomes.tally(ids)

    print(
        f"\nFAULTS bad-agents: events={len(ids)} faults=4 (garbage answers=3, hung agents=1) "
        f"lost={len(tally.lost)} doubled={len(tally.doubled)} max_stall={stall:.1f}s "
        f"garbage-votes={[(v.outcome, v.attempts) for v in garbage_votes]} "
        f"hung-vote=({hung_vote.outcome}, attempts={hung_vote.attempts}) "
        f"next-event={normal.outcome} coordinator-alive={coordinator.alive}"
    )
    assert not tally.lost and not tally.doubled
    assert normal.outcome == "approved", normal
    assert all(v.outcome == "voted" and v.counted_as == "approve" for v in normal.votes)
    assert [v.skill for v in normal.votes] == samples.REVIEWER_SKILLS
    assert coordinator.alive
