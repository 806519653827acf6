"""kill -9 an agent while it works on a vote: the decision still comes, by the timeout rule."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mesh.bus import Bus
from tests.faults.support import (
    REVIEWER_SKILLS,
    REVIEWERS,
    SLOW_AGENT,
    FaultMesh,
    Outcomes,
    assert_alive,
    eventually,
    kv_state,
    release_event,
    reviewer_policy,
    sample,
    wait_agents,
    wait_consuming,
    write_policy,
    write_slow_card,
)

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

SLOW_SKILL = "fault-slow-review"
EVENTS = 3


async def test_an_agent_killed_mid_task_counts_per_the_timeout_rule(
    fault_bus: Bus, fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    # Unanimous over the three reviewers and the slow agent; an unanswered vote rejects. The
    # per-call timeout is longer than it takes to see the slow agent at work, so the kill lands
    # during the call.
    policy = write_policy(
        tmp_path / "policies.toml",
        {
            "release.proposed": reviewer_policy(
                skills=[*REVIEWER_SKILLS, SLOW_SKILL],
                agent_timeout_s=3.0,
                deadline_s=8.0,
                retries=1,
                timeout_counts_as="reject",
            )
        },
    )
    cards = tmp_path / "cards"
    write_slow_card(cards, SLOW_SKILL)
    reviewers = fault_mesh.reviewers()
    slow = fault_mesh.slow_agent(cards)
    coordinator = fault_mesh.coordinator(policy)
    await wait_agents(fault_bus, [*REVIEWERS, SLOW_AGENT], alive=assert_alive(*reviewers, slow))
    await wait_consuming(fault_mesh, coordinator)

    run = f"killagent-{time.time_ns()}"
    ids = [f"{run}-{i}" for i in range(EVENTS)]
    started = time.monotonic()
    for event_id in ids:
        data = {**sample("clean"), "delay_s": 60.0, "fault_tag": event_id}
        await fault_bus.publish_event(release_event(event_id, data))

    # Mid-task: the slow agent has every message, and the three reviewers' votes are saved.
    async def slow_agent_at_work() -> bool:
        log = fault_mesh.log(slow)
        return all(f"slow agent received {i}" in log for i in ids)

    async def reviewers_voted() -> bool:
        for event_id in ids:
            state = await kv_state(fault_bus, "default", event_id)
            if not state or state.get("state") != "collecting":
                return False
            if set(state.get("votes", {})) != set(REVIEWER_SKILLS):
                return False
        return True

    everyone = assert_alive(*reviewers, slow, coordinator)
    await eventually(
        "slow agent received every event", slow_agent_at_work, timeout=20, alive=everyone
    )
    await eventually("reviewers' votes saved", reviewers_voted, timeout=20, alive=everyone)
    fault_mesh.kill9(slow)

    outcomes = Outcomes(fault_bus)
    async with outcomes.watching():
        missing = await outcomes.wait_all(
            ids, timeout=30, alive=assert_alive(*reviewers, coordinator)
        )
    await outcomes.refresh()
    decided = outcomes.decided_ids()
    doubled = [i for i in ids if decided[i] > 1]
    slow_votes = []
    for event_id in ids:
        d = outcomes.decision(event_id)
        if d is not None:
            slow_votes += [v for v in d.votes if v.skill == SLOW_SKILL]
    print(
        f"\nFAULTS kill-agent: events={EVENTS} kills=1 lost={len(missing)} "
        f"doubled={len(doubled)} max_stall={outcomes.max_stall(ids, started):.1f}s "
        f"slow-votes={[(v.outcome, v.counted_as, v.attempts) for v in slow_votes]}"
    )

    assert not missing, f"no decision for {sorted(missing)}\n{fault_mesh.logs_tail()}"
    assert not doubled
    assert coordinator.alive
    for event_id in ids:
        d = outcomes.decision(event_id)
        assert d is not None
        assert not outcomes.dead_letters(event_id)
        assert d.outcome == "rejected", d
        votes = {v.skill: v for v in d.votes}
        assert set(votes) == {*REVIEWER_SKILLS, SLOW_SKILL}
        for skill in REVIEWER_SKILLS:
            assert votes[skill].outcome == "voted" and votes[skill].counted_as == "approve"
        slow_vote = votes[SLOW_SKILL]
        assert slow_vote.agent == SLOW_AGENT
        assert slow_vote.outcome in ("timeout", "unavailable"), slow_vote
        assert slow_vote.counted_as == "reject", slow_vote
