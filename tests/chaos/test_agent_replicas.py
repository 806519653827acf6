"""kill -9 every agent replica in turn while releases are decided on a 3-node cluster.

Two replicas of each reviewer (as `mesh up --cluster 3` runs them). One at a time: SIGKILL a
replica (its registry entry lingers until its TTL), start a replacement, wait until the
replacement has registered, then the next. Every published event must end decided or
dead-lettered, none decided twice.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mesh.bus import Bus
from tests.chaos.support import (
    ChaosCluster,
    Publisher,
    assert_figures,
    chaos_policy,
    make_events,
    registered_pids,
    run_chaos,
    spawn_replica,
    start_mesh,
)
from tests.faults.support import FaultMesh, assert_alive, eventually

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

EVERY_S = 12.0  # one kill every ~12 s spreads the six over most of the load
REGISTER_TIMEOUT_S = 60.0


async def test_kill_9_every_agent_replica_in_turn(
    chaos_cluster: ChaosCluster, chaos_bus: Bus, chaos_fault_mesh: FaultMesh, tmp_path: Path
) -> None:
    coords, agents = await start_mesh(chaos_fault_mesh, chaos_bus, chaos_policy(tmp_path))
    running = [*coords, *agents.all()]

    def alive() -> None:
        assert_alive(*running)()

    events, expected = make_events(f"ar-{time.time_ns()}")
    rounds: list[str] = []

    async def kill_replicas(publisher: Publisher) -> int:
        kills = 0
        await asyncio.sleep(3.0)
        for agent, children in agents.by_agent.items():
            for slot, child in enumerate(list(children)):
                began = time.monotonic()
                in_flight = not publisher.finished_at
                chaos_fault_mesh.kill9(child)
                running.remove(child)
                kills += 1
                replacement = spawn_replica(chaos_fault_mesh, agent, f"{slot + 1}-r{kills}")
                children[slot] = replacement
                running.append(replacement)

                async def registered(pid: int = replacement.proc.pid, name: str = agent) -> bool:
                    return pid in await registered_pids(chaos_bus, name)

                await eventually(
                    f"{replacement.name} registered",
                    registered,
                    timeout=REGISTER_TIMEOUT_S,
                    every=0.2,
                    alive=alive,
                )
                rounds.append(
                    f"kill {kills}: {child.name} pid={child.proc.pid} at +{began - started:.0f}s "
                    f"(load {'running' if in_flight else 'done'}); {replacement.name} "
                    f"registered after {time.monotonic() - began:.1f}s, "
                    f"published {len(publisher.acked)}"
                )
                await asyncio.sleep(max(0.0, began + EVERY_S - time.monotonic()))
        return kills

    started = time.monotonic()
    figures = await run_chaos(
        "agent-replicas",
        chaos_bus,
        chaos_fault_mesh,
        events,
        expected,
        faults=kill_replicas,
        alive=alive,
    )
    print("\n" + "\n".join(rounds))
    print(figures.details())
    print(figures.line())
    assert_figures(figures, chaos_fault_mesh)
