"""A voter whose every replica is gone while the registry still lists it (its card has not
expired: an agent restarting, or connected to a frozen NATS node) cannot be asked: nobody
listens on its subject. That is not silence: the event is released (ledger state `waiting`,
the answers kept, the deadline dropped) and decided by the voter's own vote once a replica is
back, under a fresh deadline; before, it was rejected for a "timeout" that never was one."""

from __future__ import annotations

import time

import pytest

from mesh.bus import Bus
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes, kv_state
from tests.support.waits import eventually

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(150)]

GONE = "gone-review"
GONE_SKILL = "fault-gone-review"
EVENTS = 3
NO_AGENT_WAIT_S = 60.0  # read by the `procs` fixture: the wait is not what is tested here


@pytest.fixture
def card_ttl_s() -> float:
    # The dead replica stays listed for the whole test: every call to it finds nobody.
    return 60.0


async def test_an_unreachable_voter_is_waited_for_not_counted_as_silence(
    bus: Bus, procs: ProcessMesh
) -> None:
    skills = [*samples.REVIEWER_SKILLS, GONE_SKILL]
    policy = procs.policy(
        {"release.proposed": samples.policy(skills, agent_timeout_s=1.0, deadline_s=3.0)}
    )
    running = await procs.up(bus, policy, voters={GONE: GONE_SKILL})
    [gone] = running.agents.pop(GONE)
    procs.kill9(gone)  # its card lives on (card_ttl_s): the registry still lists it

    run = f"unreachable-{time.time_ns()}"
    ids = [f"{run}-{i}" for i in range(EVENTS)]
    for event_id in ids:
        await bus.publish_event(samples.release_event(event_id, samples.sample("clean")))

    async def released() -> bool:
        for event_id in ids:
            state = await kv_state(bus, "default", event_id)
            if not state or state.get("state") != "waiting":
                return False
            # The reviewers' answers are kept; the unreachable voter's "vote" is not.
            if set(state.get("votes", {})) != set(samples.REVIEWER_SKILLS):
                return False
        return True

    await eventually(released, "every event released to wait", timeout=30, alive=running.alive)

    back = procs.voter(GONE, GONE_SKILL)
    outcomes = Outcomes(bus)
    async with outcomes.watching():
        await procs.wait_agents(bus, [GONE], pids=[back.proc.pid], alive=running.alive)
        missing = await outcomes.wait_all(ids, timeout=40, alive=running.alive)
    assert not missing, f"no outcome for {sorted(missing)}\n{procs.logs_tail()}"
    for event_id in ids:
        d = outcomes.decision(event_id)
        assert d is not None and not outcomes.dead_letters(event_id)
        assert d.outcome == "approved", d.reason  # decided by the voter's vote, not silence
        votes = {v.skill: v for v in d.votes}
        assert votes[GONE_SKILL].outcome == "voted", votes[GONE_SKILL]
        for skill in samples.REVIEWER_SKILLS:
            assert votes[skill].attempts == 1  # answered once, kept across the release
