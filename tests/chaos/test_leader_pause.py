"""SIGSTOP a stream leader for longer than the cluster's heartbeats, then SIGCONT it, over and
over while 2,000 releases are decided: a pause, not a crash.

The paused node keeps its TCP connections open (clients do not notice for minutes), its peers
elect new leaders behind its back, and when it wakes up it still believes it leads. Every
published event must end decided or dead-lettered, none decided twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh import subjects
from mesh.bus import Bus
from tests.chaos.support import (
    META,
    ChaosCluster,
    Publisher,
    assert_figures,
    chaos_policy,
    leader_of,
    make_events,
    run_chaos,
    start_mesh,
    wait_healthy,
)
from tests.faults.support import FaultMesh, assert_alive

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

FIRST_AFTER_S = 2.0  # the first fault lands with events in flight
PAUSE_S = 9.0  # raft heartbeats are 1 s and elections start after 4-9 s of silence
BETWEEN_S = 3.0
# In turn: the events stream, the meta group, the decision ledger (KV), the decisions stream.
TARGETS = (
    subjects.EVENTS_STREAM,
    META,
    f"KV_{subjects.DECISIONS_BUCKET}",
    subjects.DECISIONS_STREAM,
)


async def test_sigstop_the_stream_leader_for_9_s(
    chaos_cluster: ChaosCluster, chaos_bus: Bus, chaos_fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    coords, agents = await start_mesh(chaos_fault_mesh, chaos_bus, chaos_policy(tmp_path))
    alive = assert_alive(*coords, *agents.all())
    events, expected = make_events(f"lp-{time.time_ns()}")
    rounds: list[str] = []

    async def pause_leaders(publisher: Publisher) -> int:
        pauses = 0
        await asyncio.sleep(FIRST_AFTER_S)
        while not publisher.finished_at:
            healed = await wait_healthy(chaos_bus)
            if publisher.finished_at:
                break
            stream = TARGETS[pauses % len(TARGETS)]
            node = await leader_of(chaos_bus, stream, chaos_cluster)
            began = time.monotonic()
            chaos_cluster.pause(node)
            pauses += 1
            try:
                await asyncio.sleep(PAUSE_S)
            finally:
                chaos_cluster.resume(node)
            rounds.append(
                f"pause {pauses}: {node} (leader of {stream}) at +{began - started:.0f}s for "
                f"{time.monotonic() - began:.1f}s, healed {healed:.1f}s before, "
                f"published {len(publisher.acked)}"
            )
            alive()
            await asyncio.sleep(BETWEEN_S)
        return pauses

    started = time.monotonic()
    figures = await run_chaos(
        "leader-pause",
        chaos_bus,
        chaos_fault_mesh,
        events,
        expected,
        faults=pause_leaders,
        alive=alive,
    )
    print("\n" + "\n".join(rounds))
    print(figures.details())
    print(figures.line())
    assert_figures(figures, chaos_fault_mesh)
