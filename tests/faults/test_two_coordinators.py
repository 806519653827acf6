"""Two coordinators on the same durable, over hundreds of events: each decided exactly once."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from mesh.bus import Bus
from tests.faults.support import (
    REVIEWERS,
    SAMPLE_OUTCOME,
    FaultMesh,
    Outcomes,
    assert_alive,
    ledger_mismatches,
    publish_paced,
    release_event,
    reviewer_policy,
    sample,
    wait_agents,
    wait_consuming,
    wait_settled,
    write_policy,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(180)]

EVENTS = 600
PER_S = 150.0
SAMPLES = ("clean", "secret", "phi", "untested")


async def test_two_coordinators_never_decide_an_event_twice(
    fault_bus: Bus, fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    # Generous clocks: this test is about "once", not about timeouts on a busy 2-core box.
    policy = write_policy(
        tmp_path / "policies.toml",
        {"release.proposed": reviewer_policy(agent_timeout_s=20.0, deadline_s=60.0, retries=2)},
    )
    agents = fault_mesh.reviewers()
    coordinators = [fault_mesh.coordinator(policy) for _ in range(2)]
    everyone = assert_alive(*agents, *coordinators)
    await wait_agents(fault_bus, REVIEWERS, alive=everyone)
    for c in coordinators:
        await wait_consuming(fault_mesh, c)

    run = f"two-{time.time_ns()}"
    expected: dict[str, str] = {}
    events = []
    for i in range(EVENTS):
        kind = SAMPLES[i % len(SAMPLES)]
        event = release_event(f"{run}-{i:04d}-{kind}", sample(kind))
        expected[event.id] = SAMPLE_OUTCOME[kind]
        events.append(event)

    sent_at: dict[str, float] = {}
    outcomes = Outcomes(fault_bus)
    started = time.monotonic()
    await publish_paced(fault_bus, events, per_s=PER_S, sent_at=sent_at)

    async with outcomes.watching():
        missing = await outcomes.wait_all(expected, timeout=60, alive=everyone)
        unsettled = await wait_settled(fault_bus, timeout=30) if not missing else ""
    await outcomes.refresh()  # anything a late redelivery could still have added

    decided = outcomes.decided_ids()
    dead = outcomes.dead_ids()
    doubled = sorted(i for i in expected if decided[i] > 1)
    both = sorted(i for i in expected if decided[i] and dead[i])
    by_coordinator = Counter(d.coordinator for _, d in outcomes.decisions if d.event_id in expected)
    wrong = sorted(
        i for i in expected if (d := outcomes.decision(i)) is not None and d.outcome != expected[i]
    )
    stall = outcomes.max_stall(expected, started)
    mismatched = await ledger_mismatches(fault_bus, outcomes, expected)
    shares = " ".join(f"{name}={n}" for name, n in sorted(by_coordinator.items()))
    print(
        f"\nFAULTS two-coordinators: events={EVENTS} coordinators=2 decided={len(decided)} "
        f"dlq={sum(1 for i in expected if dead[i])} lost={len(missing)} doubled={len(doubled)} "
        f"wrong={len(wrong)} ledger-mismatch={len(mismatched)} max_stall={stall:.1f}s "
        f"settled={'n/a' if missing else not unsettled} "
        f"per-coordinator: {shares}"
    )

    assert not missing, (
        f"{len(missing)} events without any outcome, e.g. {sorted(missing)[:5]}\n"
        f"errors the processes logged:\n{fault_mesh.error_summary()}"
    )
    assert not doubled, f"decided more than once: {doubled[:10]}"
    assert not unsettled, f"{unsettled}\nerrors the processes logged:\n{fault_mesh.error_summary()}"
    assert not both, f"decided and dead-lettered: {both[:10]}"
    assert not mismatched, f"ledger and published decision disagree: {mismatched[:10]}"
    assert not [i for i in expected if dead[i]], (
        f"events dead-lettered with every agent healthy: "
        f"{[(i, [d.reason for d in outcomes.dead_letters(i)]) for i in expected if dead[i]][:5]}\n"
        f"errors the processes logged:\n{fault_mesh.error_summary()}"
    )
    assert not wrong, f"decided against the reviewers' votes: {wrong[:10]}"
    # Both really ran: each is still alive and the pair decided every event between them.
    everyone()
    assert sum(by_coordinator.values()) == EVENTS
