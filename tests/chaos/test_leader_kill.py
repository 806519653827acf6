"""kill -9 a stream leader every ~10 s while 2,000 releases are decided on a 3-node cluster.

Each round waits until the cluster is whole (every stream, bucket and the coordinators' durable
has a leader and all peers current), SIGKILLs the node that leads, in turn, MESH_EVENTS, the
meta group, the decision ledger (KV) or MESH_DECISIONS, and starts it again on the same store
folder and ports a few seconds later. Every published event must end decided or dead-lettered,
none decided twice.
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
EVERY_S = 10.0
RESTART_AFTER_S = 3.0
# In turn: the events stream, the meta group, the decision ledger (KV), the decisions stream.
TARGETS = (
    subjects.EVENTS_STREAM,
    META,
    f"KV_{subjects.DECISIONS_BUCKET}",
    subjects.DECISIONS_STREAM,
)


async def test_kill_9_the_stream_leader_every_10_s(
    chaos_cluster: ChaosCluster, chaos_bus: Bus, chaos_fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    coords, agents = await start_mesh(chaos_fault_mesh, chaos_bus, chaos_policy(tmp_path))
    alive = assert_alive(*coords, *agents.all())
    events, expected = make_events(f"lk-{time.time_ns()}")
    rounds: list[str] = []

    async def kill_leaders(publisher: Publisher) -> int:
        kills = 0
        await asyncio.sleep(FIRST_AFTER_S)
        while not publisher.finished_at:
            healed = await wait_healthy(chaos_bus)
            if publisher.finished_at:
                break
            stream = TARGETS[kills % len(TARGETS)]
            node = await leader_of(chaos_bus, stream, chaos_cluster)
            began = time.monotonic()
            chaos_cluster.kill9(node)
            kills += 1
            await asyncio.sleep(RESTART_AFTER_S)
            await chaos_cluster.restart(node)
            rounds.append(
                f"kill {kills}: {node} (leader of {stream}) at +{began - started:.0f}s, "
                f"healed {healed:.1f}s before, published {len(publisher.acked)}"
            )
            alive()
            await asyncio.sleep(max(0.0, began + EVERY_S - time.monotonic()))
        return kills

    started = time.monotonic()
    figures = await run_chaos(
        "leader-kill",
        chaos_bus,
        chaos_fault_mesh,
        events,
        expected,
        faults=kill_leaders,
        alive=alive,
    )
    print("\n" + "\n".join(rounds))
    print(figures.details())
    print(figures.line())
    assert_figures(figures, chaos_fault_mesh)
