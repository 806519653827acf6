"""kill -9 an agent while it works on a vote: its call ends finding nobody listening, which is
not silence (issue 12): the event is not decided by the outage. It waits for the voter (the
answers it has kept) and, with nobody back within the wait, ends as a `no_agent` dead letter
that names the voter. (A restarted voter would answer under a fresh deadline instead:
tests/faults/test_unreachable_voter.py.)"""

from __future__ import annotations

import time

import pytest

from mesh.bus import Bus
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes, kv_state
from tests.support.waits import eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(120)]

SLOW = "slow-review"
SLOW_SKILL = "fault-slow-review"
EVENTS = 3
NO_AGENT_WAIT_S = 3.0  # read by the `procs` fixture: how long an event waits for its voter


async def test_an_agent_killed_mid_task_is_waited_for_then_dead_lettered_not_counted(
    bus: Bus, procs: ProcessMesh
) -> None:
    # Unanimous over the three reviewers and the slow agent; an unanswered vote rejects. The
    # per-call timeout is longer than it takes to see the slow agent at work, so the kill lands
    # during the call.
    skills = [*samples.REVIEWER_SKILLS, SLOW_SKILL]
    policy = procs.policy(
        {"release.proposed": samples.policy(skills, agent_timeout_s=3.0, deadline_s=8.0, retries=1)}
    )
    running = await procs.up(bus, policy, voters={SLOW: SLOW_SKILL})
    [slow] = running.agents[SLOW]
    [coordinator] = running.coordinators

    run = f"killagent-{time.time_ns()}"
    ids = [f"{run}-{i}" for i in range(EVENTS)]
    started = time.monotonic()
    for event_id in ids:
        data = {**samples.sample("clean"), "delay_s": 60.0, "fault_tag": event_id}
        await bus.publish_event(samples.release_event(event_id, data))

    # Mid-task: the slow agent has every message, and the three reviewers' votes are saved.
    def slow_agent_at_work() -> bool:
        log = procs.log(slow)
        return all(f"voter {SLOW} received {i}" in log for i in ids)

    async def reviewers_voted() -> bool:
        for event_id in ids:
            state = await kv_state(bus, "default", event_id)
            if not state or state.get("state") != "collecting":
                return False
            if set(state.get("votes", {})) != set(samples.REVIEWER_SKILLS):
                return False
        return True

    await eventually(
        slow_agent_at_work, "slow agent got every event", timeout=20, alive=running.alive
    )
    await eventually(reviewers_voted, "reviewers' votes saved", timeout=20, alive=running.alive)
    procs.kill9(slow)
    running.agents.pop(SLOW)

    outcomes = Outcomes(bus)
    async with outcomes.watching():
        missing = await outcomes.wait_all(ids, timeout=60, alive=running.alive)
    await outcomes.refresh()
    tally = outcomes.tally(ids)
    slow_votes = []
    for event_id in ids:
        d = outcomes.decision(event_id)
        if d is not None:
            slow_votes += [v for v in d.votes if v.skill == SLOW_SKILL]
    print(
        f"\nFAULTS kill-agent: events={EVENTS} kills=1 lost={len(missing)} "
        f"doubled={len(tally.doubled)} max_stall={outcomes.max_stall(ids, started):.1f}s "
        f"slow-votes={[(v.outcome, v.counted_as, v.attempts) for v in slow_votes]}"
    )

    assert not missing, f"no outcome for {sorted(missing)}\n{procs.logs_tail()}"
    assert not tally.doubled
    assert coordinator.alive
    for event_id in ids:
        # Never decided: an approval was impossible without the voter, and a rejection for
        # its death would look like a judgement.
        assert outcomes.decision(event_id) is None, outcomes.decision(event_id)
        [dead] = outcomes.dead_letters(event_id)
        assert dead.reason == "no_agent", dead
        assert SLOW_SKILL in dead.error, dead
