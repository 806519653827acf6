"""Two coordinators on the same durable, over hundreds of events: each decided exactly once."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from mesh.bus import Bus
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes, Publisher, ledger_mismatches, settled

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]

EVENTS = 600
PER_S = 150.0
KINDS = ("clean", "secret", "phi", "untested")


async def test_two_coordinators_never_decide_an_event_twice(bus: Bus, procs: ProcessMesh) -> None:
    # Generous clocks: this test is about "once", not about timeouts on a busy 2-core box.
    policy = procs.policy(
        {
            "release.proposed": samples.reviewer_policy(
                agent_timeout_s=20.0, deadline_s=60.0, retries=2
            )
        }
    )
    running = await procs.up(bus, policy, coordinators=2)

    events, expected = samples.release_events(f"two-{time.time_ns()}", EVENTS, KINDS)
    outcomes = Outcomes(bus)
    started = time.monotonic()
    await Publisher(bus, events, PER_S).run()

    async with outcomes.watching():
        missing = await outcomes.wait_all(expected, timeout=60, alive=running.alive)
        unsettled = await settled(bus, timeout=30) if not missing else ""
    await outcomes.refresh()  # anything a late redelivery could still have added

    tally = outcomes.tally(expected)
    dead = outcomes.dead_ids()
    by_coordinator = Counter(d.coordinator for _, d in outcomes.decisions if d.event_id in expected)
    stall = outcomes.max_stall(expected, started)
    mismatched = await ledger_mismatches(bus, outcomes, expected)
    shares = " ".join(f"{name}={n}" for name, n in sorted(by_coordinator.items()))
    print(
        f"\nFAULTS two-coordinators: events={EVENTS} coordinators=2 "
        f"decided={len(outcomes.decided_ids())} dlq={sum(1 for i in expected if dead[i])} "
        f"lost={len(missing)} doubled={len(tally.doubled)} wrong={len(tally.wrong)} "
        f"ledger-mismatch={len(mismatched)} max_stall={stall:.1f}s "
        f"settled={'n/a' if missing else not unsettled} per-coordinator: {shares}"
    )

    errors = f"\nerrors the processes logged:\n{procs.error_summary()}"
    assert not missing, f"{len(missing)} without any outcome, e.g. {sorted(missing)[:5]}{errors}"
    assert not tally.doubled, f"decided more than once: {tally.doubled[:10]}"
    assert not unsettled, f"{unsettled}{errors}"
    assert not tally.both, f"decided and dead-lettered: {tally.both[:10]}"
    assert not mismatched, f"ledger and published decision disagree: {mismatched[:10]}"
    assert not [i for i in expected if dead[i]], (
        f"events dead-lettered with every agent healthy: "
        f"{[(i, [d.reason for d in outcomes.dead_letters(i)]) for i in expected if dead[i]][:5]}"
        f"{errors}"
    )
    assert not tally.wrong, f"decided against the reviewers' votes: {tally.wrong[:10]}"
    # Both really ran: each is still alive and the pair decided every event between them.
    running.alive()
    assert sum(by_coordinator.values()) == EVENTS
