"""kill -9 every agent replica in turn while releases are decided on a 3-node cluster.

Two replicas of each reviewer (as `mesh up --cluster 3` runs them). One at a time: SIGKILL a
replica (its registry entry lingers until its TTL), start a replacement, wait until the
replacement has registered, then the next. Every published event must end decided or
dead-lettered, none decided twice.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.chaos.support import Rig
from tests.support.outcomes import Publisher

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(420)]

EVERY_S = 12.0  # one kill every ~12 s spreads the six over most of the load
REGISTER_TIMEOUT_S = 60.0


async def test_kill_9_every_agent_replica_in_turn(chaos: Rig) -> None:
    running = await chaos.start_mesh()
    rounds: list[str] = []

    async def kill_replicas(publisher: Publisher) -> int:
        kills = 0
        await asyncio.sleep(3.0)
        for agent, children in running.agents.items():
            for slot, child in enumerate(list(children)):
                began = time.monotonic()
                in_flight = not publisher.finished_at
                chaos.procs.kill9(child)
                kills += 1
                children[slot] = replacement = chaos.procs.reviewer(agent, f"{slot + 1}-r{kills}")
                await chaos.procs.wait_agents(
                    chaos.bus,
                    [agent],
                    pids=[replacement.proc.pid],
                    timeout=REGISTER_TIMEOUT_S,
                    alive=running.alive,
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
    await chaos.check("agent-replicas", running, kill_replicas, rounds)
