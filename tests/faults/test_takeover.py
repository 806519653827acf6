"""A coordinator killed while it waits for a vote, with the shipped policy clocks: the one that
takes the event over must still hear from the (healthy) voter, not count it as a timeout."""

from __future__ import annotations

import time

import pytest

from coordinator import policy as policies
from coordinator.service import ACK_WAIT_S, LEASE_S
from mesh.bus import Bus
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes
from tests.support.waits import all_alive, eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

VOTER = "slow-review"
SKILL = "fault-takeover-review"


async def test_a_take_over_with_the_shipped_clocks_asks_the_voter_again(
    bus: Bus, procs: ProcessMesh
) -> None:
    shipped = policies.load().get("release.proposed")
    assert shipped is not None
    # The shipped clocks of release.proposed, one voter: the slow agent, which answers well
    # within agent_timeout_s (and remembers its answer by message id, so a repeat is instant).
    delay_s = shipped.agent_timeout_s / 2
    policy = procs.policy(
        {
            "fault.takeover": samples.policy(
                [SKILL],
                agent_timeout_s=shipped.agent_timeout_s,
                deadline_s=shipped.deadline_s,
                retries=shipped.retries,
                timeout_counts_as=shipped.timeout_counts_as,
                decision_type="fault.takeover.decided",
            )
        }
    )
    running = await procs.up(bus, policy, reviewers=(), voters={VOTER: SKILL})
    [agent] = running.agents[VOTER]
    [first] = running.coordinators

    event_id = f"takeover-{time.time_ns()}"
    data = {"delay_s": delay_s, "fault_tag": event_id}
    started = time.monotonic()
    await bus.publish_event(samples.release_event(event_id, data, "fault.takeover"))

    await eventually(
        lambda: f"voter {VOTER} received {event_id}" in procs.log(agent),
        "the voter was asked",
        timeout=20,
        alive=running.alive,
    )
    procs.kill9(first)  # mid-collection: the vote is on its way to a dead coordinator
    second = procs.coordinator(policy)

    outcomes = Outcomes(bus)
    async with outcomes.watching():
        missing = await outcomes.wait_all([event_id], timeout=60, alive=all_alive(agent, second))
    await outcomes.refresh()
    d = outcomes.decision(event_id)
    vote = d.votes[0] if d else None
    print(
        f"\nFAULTS takeover-shipped-clocks: events=1 kills=1 lost={len(missing)} "
        f"doubled={max(0, outcomes.decided_ids()[event_id] - 1)} "
        f"max_stall={outcomes.max_stall([event_id], started):.1f}s "
        f"deadline_s={shipped.deadline_s} LEASE_S={LEASE_S} ACK_WAIT_S={ACK_WAIT_S} "
        f"outcome={d.outcome if d else None} takeovers={d.takeovers if d else None} "
        f"vote=({vote.outcome if vote else None}, attempts={vote.attempts if vote else None}, "
        f"{vote.error if vote else ''!r})"
    )

    assert not missing, procs.logs_tail()
    assert d is not None and outcomes.decided_ids()[event_id] == 1
    assert d.takeovers == 1, d
    # The voter was alive and answered within its timeout the whole time: only the crash of the
    # coordinator stood between it and the tally. Counting it as "timeout" (and so rejecting)
    # turns every coordinator crash mid-decision into a rejection.
    assert vote is not None and vote.outcome == "voted", vote
    assert d.outcome == "approved", d
