"""A burst waits in JetStream, not in timeouts: 1,000 release events published at once to the
three shipped reviewers (one replica each, as processes) under the shipped release policy
(1.5 s per call, 4 s per decision, an unanswered vote rejects). Every event is decided, none
wrongly (clean approved, secret-bearing rejected), and no circuit breaker opens.

Before admission (issue 12), 2,000 clean events this way ended 1,967 rejected: 768 calls at
once piled onto three agents, timed out, and the timeouts opened the breakers.

Prints the drain time and the p99 of Decision.latency_ms (run with -s); asserts no timing.
"""

from __future__ import annotations

import asyncio
import json
import math
import time

import pytest

from mesh import subjects
from mesh.bus import Bus
from tests.support import samples
from tests.support.launcher import ProcessMesh
from tests.support.outcomes import Outcomes

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(240)]

EVENTS = 1000
KINDS = ("clean", "secret")
DRAIN_TIMEOUT_S = 150.0  # a bound on the wait, never a measurement


async def test_a_burst_is_decided_right_with_no_breaker_opened(
    bus: Bus, procs: ProcessMesh
) -> None:
    running = await procs.up(bus)  # the shipped policies (coordinator/policies.toml)
    [coordinator] = running.coordinators
    events, expected = samples.release_events(f"burst-{time.time_ns()}", EVENTS, KINDS)

    started = time.monotonic()
    # At once: every publish in flight together (the server acks them as it stores them).
    acks = await asyncio.gather(*(bus.publish_event(e) for e in events))
    published = time.monotonic()
    assert len(acks) == EVENTS

    outcomes = Outcomes(bus)
    async with outcomes.watching():
        missing = await outcomes.wait_all(expected, timeout=DRAIN_TIMEOUT_S, alive=running.alive)
    drained = max(outcomes.first_arrival().values(), default=time.monotonic())
    await outcomes.refresh()

    tally = outcomes.tally(expected)
    latencies = sorted(
        d.latency_ms for _, d in outcomes.decisions if d.event_id in expected and d.latency_ms
    )
    p50, p99, worst = (_pct(latencies, q) for q in (0.5, 0.99, 1.0))
    calls = sorted(
        v.latency_ms for _, d in outcomes.decisions if d.event_id in expected for v in d.votes
    )
    reply = await bus.nc.request(subjects.COORDINATOR_STATUS, b"", timeout=5)
    breakers = json.loads(reply.data).get("breakers", {})
    log = procs.log(coordinator)
    opened = [line for line in log.splitlines() if "circuit breaker" in line]
    print(
        f"\nFAULTS burst: events={EVENTS} voters=3 publish={published - started:.1f}s "
        f"drain={drained - started:.1f}s p50={p50:.0f}ms p99={p99:.0f}ms max={worst:.0f}ms "
        f"call-p50={_pct(calls, 0.5):.0f}ms "
        f"decided={len(outcomes.decided_ids())} lost={len(missing)} wrong={len(tally.wrong)} "
        f"dead={len(tally.dead_only)} breakers={breakers} breaker-log-lines={len(opened)}"
    )

    errors = f"\nerrors the processes logged:\n{procs.error_summary()}"
    assert not missing, f"{len(missing)} without any outcome, e.g. {sorted(missing)[:5]}{errors}"
    assert not tally.dead_only, f"dead-lettered: {tally.dead_only[:5]}{errors}"
    assert not tally.doubled, tally.doubled[:5]
    assert not tally.wrong, f"{len(tally.wrong)} wrong, e.g. {tally.wrong[:5]}"
    assert all(state == "closed" for state in breakers.values()), breakers
    assert not opened, opened[:5]
    assert coordinator.alive


def _pct(sorted_values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of already sorted values; NaN for none."""
    if not sorted_values:
        return float("nan")
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
